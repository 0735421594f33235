"""`python tests/kill_bench.py KIND N BENCH-ARGUMENTS...`: run `bench` and SIGKILL it at its N-th flush to
disk (os.fsync) of a KIND of file, as a crash in the middle of a write would leave things (the kill soak,
tests/test_kill_soak.py). Kinds:

    checkpoint  a checkpoint's temporary file, cut to half its bytes first (killed mid-write)
    record      another run file's temporary file (config.json, record.json), cut in half first
    folder      a folder, just after a file was renamed into it (before the rename is flushed)
    journal     Optuna's journal file, its last line cut in half first (a torn append)
    none        no kill

One worker runs at a time in the soak, so a running trial that named no worker yet when a command starts is
a killed one: STARTING_SECONDS is 0 here (bench.sweeps waits a minute for it, for the sake of workers that
share the study).
"""

import os
import signal
import sys
from pathlib import Path


def kind_of(descriptor: int) -> str:
    path = Path(os.readlink(f"/proc/self/fd/{descriptor}"))
    if path.is_dir():
        return "folder"
    if path.name.endswith(".tmp"):
        return "checkpoint" if ".ckpt." in path.name else "record"
    return "journal" if path.name.endswith(".log") else "other"


def tear(descriptor: int, kind: str) -> None:
    """Cut the bytes just written short."""
    size = os.fstat(descriptor).st_size
    if kind == "journal":  # half of the last line
        with open(f"/proc/self/fd/{descriptor}", "rb") as journal:  # the writer's descriptor is append-only
            journal.seek(max(size - (1 << 16), 0))
            tail = journal.read()
        line = len(tail) - tail.rstrip(b"\n").rfind(b"\n") - 1
        os.ftruncate(descriptor, size - line // 2)
    elif kind in ("checkpoint", "record"):
        os.ftruncate(descriptor, size // 2)


def arm(kind: str, count: int) -> None:
    flush, seen = os.fsync, 0

    def fsync(descriptor: int) -> None:
        nonlocal seen
        found = kind_of(descriptor)
        if found == kind:
            seen += 1
            if seen == count:
                tear(descriptor, found)
                os.kill(os.getpid(), signal.SIGKILL)
        flush(descriptor)

    os.fsync = fsync


if __name__ == "__main__":
    kind, count, *arguments = sys.argv[1:]
    if kind != "none":
        arm(kind, int(count))
    import bench.sweeps
    from bench.cli import main

    bench.sweeps.STARTING_SECONDS = 0
    sys.exit(main(arguments))
