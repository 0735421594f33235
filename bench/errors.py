"""The one exception type for mistakes a user can make (bad spec, missing file, out-of-range value).

The CLI turns it into exit code 2 and a single line on stderr; everything else is a bug and keeps its traceback.
"""


class BenchError(Exception):
    """A user-caused error: the message says what is wrong and where."""
