"""The results database: an Optuna storage in which every run is a trial with its record attached.

`bench train` and `bench run` add completed trials; `bench sweep` runs studies in the same storage; the
reports read it back. The default is a SQLite file in the working directory; any Optuna storage URL works
(sqlite:///path.db, postgresql://..., or a journal file for several processes on one machine).
"""

from __future__ import annotations

import re
import warnings

import optuna

from bench.errors import BenchError
from bench.records import plain

DEFAULT_STORAGE = "sqlite:///bench.db"
# The figures shown as their own columns by study.trials_dataframe(); the whole record is attribute "record".
SUMMARY_KEYS = ("model", "corpus", "valid_ppl", "test_ppl", "tokens_per_second", "minutes_per_epoch")
HEARTBEAT_SECONDS = 20


def redact(url: str) -> str:
    """The storage URL with any password replaced, for printing."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def requeue_stale_trials() -> optuna.storages.RetryHeartbeatStaleTrialCallback:
    """Optuna's callback that requeues a failed stale trial with its parameters. Experimental in Optuna's
    terms (since 2.8, unchanged since); the warning saying so is not the user's business."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback()


def open_storage(url: str | None = None, heartbeat: bool = False):
    """An Optuna storage from a URL: RDB URLs as they are; `journal:PATH` for Optuna's journal file.

    `heartbeat` (SQL storages; the journal has none): every running trial pings the database, and a trial
    whose worker stopped pinging is failed and requeued with its parameters by the next worker of the study.
    """
    url = url or DEFAULT_STORAGE
    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
        beats = dict(heartbeat_interval=HEARTBEAT_SECONDS, grace_period=3 * HEARTBEAT_SECONDS,
                     heartbeat_stale_trial_callback=requeue_stale_trials())
        # SQLite: concurrent workers wait for the write lock instead of failing after sqlite3's 5 s default
        engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
        return optuna.storages.RDBStorage(url, engine_kwargs=engine, **(beats if heartbeat else {}))
    except Exception as error:  # SQLAlchemy and driver errors: a bad URL or an unreachable server
        raise BenchError(f"cannot open storage {redact(url)}: {str(error).splitlines()[0]}") from None


def save_record(record: dict, storage, study_name: str, metric: str = "valid_ppl") -> optuna.trial.FrozenTrial:
    """Add the finished run `record` to `study_name` as a completed trial valued by `metric`."""
    study = optuna.create_study(study_name=study_name, storage=storage, load_if_exists=True,
                                direction="maximize" if metric.endswith("f1") else "minimize")
    attrs = record_attributes(record)
    trial = optuna.trial.create_trial(value=attrs["record"][metric], user_attrs=attrs)
    study.add_trial(trial)
    return trial


def record_attributes(record: dict) -> dict:
    """A trial's user attributes for the run `record`: all of it as "record", plus the SUMMARY_KEYS columns."""
    record = plain(record)
    return {"record": record, **{k: record.get(k) for k in SUMMARY_KEYS}}
