"""The suite's exceptions that end a command with one line and a promised exit code (bench.cli.main).

BenchError: a mistake a user can make (bad spec, missing file, out-of-range value): exit 2, nothing written.
RunFailed: a run that failed (diverged, or raised), its failed record stored: exit 1.
Interrupted: SIGINT or SIGTERM: exit 128 + the signal's number. It is not an Exception, so that no `except
Exception` on the way (Optuna's, the objective's) mistakes it for a failed trial, and not a KeyboardInterrupt,
which Lightning turns into sys.exit(1).
Anything else is a bug: exit 1, one line; `bench --debug` shows its traceback.
"""


class BenchError(Exception):
    """A user-caused error: the message says what is wrong and where. `key`, where the check that failed knows
    it, is what the error is about (a configuration's hyper-parameter, a sweep spec's key path), so that a
    caller can say where that was given."""

    def __init__(self, message: str, key: str | tuple | None = None):
        super().__init__(message)
        self.key = key


class RunFailed(Exception):
    """A run that failed; its failed trial (with the reason) is stored."""


class Interrupted(BaseException):
    """The command was stopped by a signal."""

    def __init__(self, signal_number: int):
        super().__init__(signal_number)
        self.signal_number = signal_number


def one_line(error: BaseException) -> str:
    """`Type: first line of the message`, for a failed run's reason and the CLI's last line."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
