"""Every use of a dependency's private API or internal format, in one place (pyproject.toml bounds Optuna
below 6 for them). tests/test_adapters.py has one test per item here, failing on a release that changes it.

- JournalFile: Optuna's journal file, with a repair run under its lock before each append; it writes the
  file's lines itself, as Optuna's JournalFileBackend.append_logs does (one compact JSON object a line).
- trial_id, trial_storage: the storage's id of a trial, and a live trial's storage, which Optuna's
  storage methods (set_trial_state_values, get_trial) need and its Trial and FrozenTrial keep private.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock


class JournalFile(JournalFileBackend):
    """Optuna's journal file calling `repair(path)` under the file's lock when opened and before every append
    (bench.store cuts a torn last line there, which the append would otherwise glue to its record)."""

    def __init__(self, path: str, repair: Callable[[Path], None]):
        self.path, self.repair = Path(path), repair
        self.lock = JournalFileSymlinkLock(path)  # Optuna's default lock, kept to take it around the repair
        super().__init__(path, lock_obj=self.lock)
        with self.locked():
            repair(self.path)

    @contextmanager
    def locked(self):
        self.lock.acquire()
        try:
            yield
        finally:
            self.lock.release()

    def append_logs(self, logs: list[dict]) -> None:
        with self.locked():
            self.repair(self.path)
            text = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs)
            with open(self.path, "ab") as handle:  # as Optuna's append_logs
                handle.write(text.encode())
                handle.flush()
                os.fsync(handle.fileno())


def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """The storage's id of `trial` (its number counts within the study, the id across the storage)."""
    return trial._trial_id


def trial_storage(trial: optuna.Trial) -> optuna.storages.BaseStorage:
    return trial.study._storage
