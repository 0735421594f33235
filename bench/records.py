"""Run records as plain JSON: what the store keeps as trial attributes and a run folder as record.json."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from bench.errors import BenchError


def plain(value):
    """The record as JSON-safe values: NaN/inf become None, numpy scalars Python numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return json.loads(json.dumps(value, default=float))


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it: `path` is never half-written."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    temporary.replace(path)


def check_writable(folder: Path) -> None:
    """A user error before any work when `folder` cannot be made or written (creating it is harmless)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BenchError(f"cannot write into {folder}: {error.strerror or error}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BenchError(f"cannot write into {folder}: permission denied")
