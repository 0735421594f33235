"""Secrets out of everything the suite writes: one function masks the password of any URL in a text.

Forms covered: `scheme://user:PASSWORD@host` with any user name (empty included) and a password holding `@`,
`:` or `/` (the userinfo runs to the last `@` of the URL: over-masking a query's `@` is harmless, leaking a
password is not), and `password=...` in a query string or a libpq key=value string. Every password seen is
also remembered, so a library message that quotes it in another form (decoded, alone) is masked too.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

MASK = "***"
# scheme://[user]:SECRET@ -- greedy up to the last @ of the whitespace-free run: the host follows the last @
USERINFO = re.compile(r"(?P<keep>\b[A-Za-z][\w+.-]*://[^\s:/@]*:)(?P<secret>\S*)@")
# ?password=SECRET&... or password=SECRET in a key=value connection string
PARAMETER = re.compile(r"(?P<keep>\b(?:password|passwd|pwd)=)(?P<secret>[^&\s;'\"]*)", re.IGNORECASE)
_seen: set[str] = set()


def redact(text: str) -> str:
    """`text` with every URL password (and every password redact has seen before) replaced by ***."""
    for pattern in (USERINFO, PARAMETER):
        for match in pattern.finditer(text):
            secret = match["secret"]
            if secret and secret != MASK:
                _seen.update({secret, unquote(secret)})
        text = pattern.sub(lambda m: m["keep"] + (MASK if m["secret"] else "") + m[0][m.end("secret") - m.start():],
                           text)
    for secret in sorted(_seen, key=len, reverse=True):
        if len(secret) >= 3:  # shorter ones would mask ordinary words of the text
            text = text.replace(secret, MASK)
    return text
