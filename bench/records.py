"""Run records (RunRecord) and plain JSON: what the store keeps as trial attributes and a run folder as
record.json."""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from bench.errors import BenchError

RUN_KEYS = ("model", "corpus")
SPEED_KEYS = ("epochs", "train_tokens", "train_seconds", "training_flops_per_token", "stopped_by", "wall_minutes",
              "curve", "resumed", "recovered_from", "resume_found_no_checkpoint", "test_seconds")
RATE_KEYS = ("tokens_per_second", "minutes_per_epoch", "gflops")  # derived from the raw counts; stored before they were
PROVENANCE_KEYS = ("parameters", "peak_memory_mb", "device", "devices", "precision", "matmul_precision", "threads",
                   "run_dir", "seed", "git_commit", "versions", "config", "plugin")


@dataclass(frozen=True)
class RunRecord:
    """A finished run's record by concern, and the one way a record is written and read: `to_dict` is the flat
    record the store's user attribute "record", record.json, the W&B summary and report rows hold; `from_dict`
    reads one back, whatever it holds (a key of no known concern is a quality figure).

    The speed part carries the raw counts -- epochs trained, training tokens and seconds (steps only), and the
    model's FLOPs per training token where it counts them -- and the rates tokens/s, minutes/epoch and achieved
    GFLOP/s follow from them. A record stored before it carried the counts keeps the rates it stored."""

    run: dict  # model, corpus
    quality: dict  # the module's results; language models: NN+KN, the corpus's oracle and unigram, time to target
    speed: dict  # SPEED_KEYS: the raw counts, what stopped the run, clock figures, the validation curve
    provenance: dict  # parameters, memory, devices, precision, threads, run folder, seed, commit, versions, ...

    @property
    def has_counts(self) -> bool:
        return self.speed.get("train_seconds") is not None

    @property
    def tokens_per_second(self) -> float | None:
        if not self.has_counts:
            return self.speed.get("tokens_per_second")
        return self.speed["train_tokens"] / max(self.speed["train_seconds"], 1e-9)

    @property
    def minutes_per_epoch(self) -> float | None:
        """Training minutes per epoch (of the stored epochs: a fraction when a budget cut the last one short)."""
        if not self.has_counts:
            return self.speed.get("minutes_per_epoch")
        return self.speed["train_seconds"] / self.speed["epochs"] / 60 if self.speed["epochs"] else 0.0

    @property
    def gflops(self) -> float | None:
        """Achieved training GFLOP/s: the model's FLOPs per training token times tokens/s (None: not counted)."""
        if not self.has_counts:
            return self.speed.get("gflops")
        flops = self.speed.get("training_flops_per_token")
        return flops * self.tokens_per_second / 1e9 if flops else None

    def to_dict(self) -> dict:
        rates = {"tokens_per_second": self.tokens_per_second, "minutes_per_epoch": self.minutes_per_epoch,
                 "gflops": self.gflops}
        return {**self.run, **self.quality, **self.speed, **(rates if self.has_counts else {}), **self.provenance}

    @classmethod
    def from_dict(cls, record: dict) -> RunRecord:
        counted = record.get("train_seconds") is not None
        speed_keys = SPEED_KEYS if counted else (*SPEED_KEYS, *RATE_KEYS)
        known = (*RUN_KEYS, *SPEED_KEYS, *RATE_KEYS, *PROVENANCE_KEYS)
        return cls(run={k: v for k, v in record.items() if k in RUN_KEYS},
                   quality={k: v for k, v in record.items() if k not in known},
                   speed={k: v for k, v in record.items() if k in speed_keys},
                   provenance={k: v for k, v in record.items() if k in PROVENANCE_KEYS})


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
