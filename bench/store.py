"""The results database: an Optuna storage in which every run is a trial with its record attached.

`bench train` and `bench run` add completed trials; `bench sweep` runs studies in the same storage; the
reports read it back. The default is a SQLite file in the working directory; any Optuna storage URL works
(sqlite:///path.db, postgresql://..., or a journal file for several processes on one machine).
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
import warnings
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from bench.adapters import JournalFile
from bench.errors import BenchError, RunFailed
from bench.records import RunRecord, plain
from bench.redact import redact
from bench.tasks import metric_task

DEFAULT_STORAGE = "sqlite:///bench.db"
# The figures shown as their own columns by study.trials_dataframe(); the whole record is attribute "record".
SUMMARY_KEYS = ("model", "corpus", "valid_ppl", "test_ppl", "tokens_per_second", "minutes_per_epoch")
HEARTBEAT_SECONDS = 20
MAX_RETRY = 2  # a stale trial (its worker killed, or out of memory) is run again at most this often
CREATE_ATTEMPTS = 5  # workers creating one new database together: the losers of the schema race retry


def cut_torn_tail(path: Path, block: int = 1 << 16) -> None:
    """Truncate `path` after its last newline when it does not end with one (a writer killed mid-append),
    warning with the line number: the next record would otherwise be glued to it, and neither Optuna nor
    `bench report` could read the file. Run under the journal's lock before every append (JournalFile)."""
    with open(path, "r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        end = size
        while end:  # back to the last newline, a block at a time
            start = max(end - block, 0)
            handle.seek(start)
            chunk = handle.read(end - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        if end == size:
            return
        handle.seek(0)
        line, remaining = 1, end
        while remaining:
            piece = handle.read(min(block, remaining))
            line, remaining = line + piece.count(b"\n"), remaining - len(piece)
        handle.truncate(end)
        os.fsync(handle.fileno())
    print(f"bench: warning: {path}, line {line}: torn (a writer stopped mid-line); cut its {size - end} bytes",
          file=sys.stderr, flush=True)


def check_journal(path: Path) -> None:
    """Every complete line a JSON record: appends are locked and fsynced, so a bad line before the tail is
    damage, which Optuna would report as a bare JSON error."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if line.endswith(b"\n") and not is_json(line):
                raise BenchError(f"{path}, line {number}: not a journal record (the file is damaged)")


def is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


class RequeueStaleTrials(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Optuna's callback that requeues a failed stale trial with its parameters, at most `max_retry` times
    (None: always). A trial past that is not requeued by Optuna; here it ends as a failed copy with its
    reason (fail_reason), which holds its place in the study's count like any failed run."""

    def __init__(self, max_retry: int | None):
        with warnings.catch_warnings():  # experimental since Optuna 2.8, unchanged since: not the user's business
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__init__(max_retry=max_retry)
        self.max_retry = max_retry

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            history = [*self.retry_history(trial), trial.number]  # before Optuna's call, which appends to it
        super().__call__(study, trial)
        if self.max_retry is not None and len(history) > self.max_retry:
            reason = (f"its worker stopped {len(history)} times (killed, or out of memory), trials "
                      f"{', '.join(map(str, history))}; not retried more than max_retry {self.max_retry}")
            study.add_trial(optuna.trial.create_trial(
                state=TrialState.FAIL, params=trial.params, distributions=trial.distributions,
                user_attrs={**trial.user_attrs, "fail_reason": reason},
                system_attrs={**trial.system_attrs, "failed_trial": history[0], "retry_history": history}))


def open_storage(url: str | None = None, heartbeat: bool = False, create: bool = True, max_retry: int = MAX_RETRY):
    """An Optuna storage from a URL: RDB URLs as they are; `journal:PATH` for Optuna's journal file.

    `heartbeat` (SQL storages; the journal has none): every running trial pings the database, and a trial
    whose worker stopped pinging is failed and requeued with its parameters by the next worker of the study,
    at most `max_retry` times (RequeueStaleTrials).
    `create=False` (reports) reads an existing database and writes nothing into it, not even a schema.
    """
    url, file = url or DEFAULT_STORAGE, storage_file(url)
    if url.startswith("journal:"):
        return open_journal(file, create)
    if file is not None:
        check_sqlite(file, create)
    beats = dict(heartbeat_interval=HEARTBEAT_SECONDS, grace_period=3 * HEARTBEAT_SECONDS,
                 heartbeat_stale_trial_callback=RequeueStaleTrials(max_retry))
    # SQLite: concurrent workers wait for the write lock instead of failing after sqlite3's 5 s default
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    for attempt in range(CREATE_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, skip_table_creation=not create,
                                              **(beats if heartbeat else {}))
        except Exception as error:  # SQLAlchemy and driver errors: a bad URL, an unreachable server, a race
            # Workers creating one new database together both find no schema and both write it: the loser
            # fails on a unique constraint or an existing table, and finds the schema complete on a retry.
            racing = create and any(word in str(error) for word in ("UNIQUE constraint", "already exists",
                                                                     "duplicate key"))
            if not racing or attempt == CREATE_ATTEMPTS - 1:
                raise BenchError(redact(f"cannot open storage {url}: {str(error).splitlines()[0]}")) from None
            time.sleep(0.2 * (attempt + 1))


def storage_file(url: str | None) -> Path | None:
    """The file of a storage URL (a journal, an SQLite database); None for a database server or in memory."""
    url = url or DEFAULT_STORAGE
    if url.startswith("journal:"):
        return Path(url.removeprefix("journal:"))
    if url.startswith("sqlite:///") and url.removeprefix("sqlite:///") not in ("", ":memory:"):
        return Path(url.removeprefix("sqlite:///"))
    return None


def open_journal(path: Path, create: bool):
    if not create and not path.is_file():
        raise BenchError(f"no results database at {path}: run `bench run` or `bench train` first")
    try:
        backend = JournalFile(str(path), repair=cut_torn_tail) if create else JournalFileBackend(str(path))
        check_journal(path)
        return optuna.storages.JournalStorage(backend)
    except OSError as error:
        raise BenchError(f"cannot open storage journal:{path}: {error.strerror}") from None


def check_sqlite(path: Path, create: bool) -> None:
    """An SQLite results database that exists must be a sound SQLite file (PRAGMA quick_check): Optuna would
    fail later, mid-run, with an internal error. A report reads only an existing, non-empty database."""
    if not path.is_file() or path.stat().st_size == 0:
        if create:
            return
        raise BenchError(f"no results database at {path}" + (" (the file is empty)" if path.is_file() else "")
                         + ": run `bench run` or `bench train` first")
    with open(path, "rb") as handle:
        if handle.read(16) != b"SQLite format 3\0":
            raise BenchError(f"{path}: not an SQLite database")
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
        try:
            verdict = connection.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            connection.close()
    except sqlite3.DatabaseError as error:
        verdict = str(error)
    if verdict != "ok":  # SQLite's report starts with a "*** in database main ***" header line
        problem = next((line for line in verdict.splitlines() if not line.startswith("***")), verdict)
        raise BenchError(f"{path}: the SQLite database is damaged ({problem}); restore it from a copy or give "
                         "another --storage")


def save_record(record: dict, storage, study_name: str, metric: str = "valid_ppl") -> optuna.trial.FrozenTrial:
    """Add the finished run `record` to `study_name` as a completed trial valued by `metric`; a run whose
    metric is missing or not finite (it diverged) is stored as a failed trial with its reason (RunFailed)."""
    attrs = record_attributes(record)
    value = attrs["record"].get(metric)
    if value is None:
        reason = f"{metric} is {record.get(metric)} (the run diverged)"
        save_failure(storage, study_name, metric, reason, attrs)
        raise RunFailed(f"{record['model']} on {record['corpus']} failed: {reason}; stored as a failed trial "
                        f"of study {study_name}")
    study = open_record_study(storage, study_name, metric)
    trial = optuna.trial.create_trial(value=value, user_attrs=attrs)
    study.add_trial(trial)
    return trial


def save_failure(storage, study_name: str, metric: str, reason: str, attrs: dict | None = None) -> None:
    """Store a failed run as a FAIL trial with user attribute "fail_reason" (and its record when it has one)."""
    study = open_record_study(storage, study_name, metric)
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={**(attrs or {}),
                                                                                 "fail_reason": reason}))


def open_record_study(storage, study_name: str, metric: str) -> optuna.Study:
    return optuna.create_study(study_name=study_name, storage=storage, load_if_exists=True,
                               direction=metric_task(metric).direction)


def record_attributes(record: dict) -> dict:
    """A trial's user attributes for the run `record` (RunRecord.to_dict): all of it as "record", plus the
    SUMMARY_KEYS columns."""
    record = plain(RunRecord.from_dict(record).to_dict())
    return {"record": record, **{k: record.get(k) for k in SUMMARY_KEYS}}
