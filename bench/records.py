"""Run records as plain JSON: what the store keeps as trial attributes and a run folder as record.json."""

from __future__ import annotations

import contextlib
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


def write_atomically(path: Path, data: str | bytes) -> None:
    """Write `data` to a temporary file beside `path`, flush it to disk, rename it over `path` and flush the
    folder: a kill or a power loss at any moment leaves the old file or the new one, never part of one (a
    rename alone can reach the disk before the data it names)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}{TEMPORARY_SUFFIX}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


TEMPORARY_SUFFIX = ".tmp"


def sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk. Windows opens no folders and needs no such flush."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_orphaned_temporaries(folder: Path) -> None:
    """Delete the temporary files of write_atomically in `folder` whose writer is gone (killed before its
    rename); a live writer's (another process on the same run) stays."""
    for temporary in folder.glob(f".*{TEMPORARY_SUFFIX}"):
        pid = temporary.name.removesuffix(TEMPORARY_SUFFIX).rpartition(".")[2]
        if pid.isdigit() and not process_alive(int(pid)):
            temporary.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def read_json(path: Path):
    """The JSON value in `path`, or None when the file is missing or does not parse (damaged)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def check_writable(folder: Path) -> None:
    """A user error, before any work, when `folder` is a file or lies under one, cannot be created or cannot
    be written. Writes nothing: the folders it creates to find out are removed again (who writes creates them)."""
    for ancestor in (folder, *folder.parents):
        if ancestor.exists() and not ancestor.is_dir():
            raise BenchError(f"cannot write into {folder}: {ancestor} is a file, not a folder")
    missing = [path for path in (folder, *folder.parents) if not path.exists()]  # innermost first
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BenchError(f"cannot write into {folder}: {error.strerror or error}") from None
    writable = os.access(folder, os.W_OK | os.X_OK)
    for created in missing:
        with contextlib.suppress(OSError):  # another process began to write into it meanwhile
            created.rmdir()
    if not writable:
        raise BenchError(f"cannot write into {folder}: permission denied")
