"""`bench sweep`: an Optuna study over a spec (bench.sweep_spec), one harness run and one W&B run per trial.

Every trial is one bench.harness.run_experiment of a bench.config.make_config configuration; its record is
stored as bench.store.save_record stores runs (user attributes "record" + the summary columns), in the
suite's results database, so `bench report` reads sweeps too. Pruning: optuna-integration's Lightning
callback on the task's epoch metric (val_ppl, or val_f1 for taggers); it raises TrialPruned from inside fit.

Counting. `trials` (or --trials) is the number of trials the study holds in total, not more per command: a
trial holds a place when it is complete, pruned, failed by its own run (NaN loss, an exception: user
attribute "fail_reason"), running or queued. Optuna's MaxTrialsCallback counts states only, and a trial
whose worker died is FAIL while its requeued copy is WAITING -- counted twice, or a diverging trial not
counted at all and the study never ending -- so the count is `holds_place` below. Re-running the command
resumes: it recovers dead workers' trials and runs only the places still open. Workers sharing a study
(--n-jobs processes, or the same command on several machines against one PostgreSQL URL) check the count
before each trial and again inside it against the trials numbered before it (numbers are assigned in
creation order by the storage), so two workers racing for the last place cannot both run: the later one is
marked "surplus" (FAIL, holding no place) and stops.

Dead workers. SQL storages ping a heartbeat (bench.store.open_storage): Optuna fails a trial whose pings
stopped and RetryHeartbeatStaleTrialCallback requeues its parameters. The journal storage has no heartbeat,
so each trial records its worker (host, pid, process start time) and a command starting on that host fails
and requeues, the same way, the trials whose process is gone (on SQL storages too: no wait for the grace
period there). Either way a trial is run again at most `max_retry` times (the spec's, or --max-retry), then
failed with its reason: a trial that kills its worker every time (out of memory) is not requeued forever.
A trial a signal stopped is requeued without that bound: the user stopped it, not the trial itself.

Workers are processes, not Optuna's n_jobs threads: Lightning seeds the global RNGs per run and its
WandbLogger reuses whatever W&B run is active in the process, so threads would mix trials.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import multiprocessing
import os
import socket
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState
from optuna_integration import PyTorchLightningPruningCallback

from bench.adapters import trial_id, trial_storage
from bench.errors import BenchError, Interrupted, one_line
from bench.harness import cached_corpus, cached_tagged_corpus, finished_record, run_experiment
from bench.hosts import sharing_warnings
from bench.records import RunRecord, plain
from bench.redact import redact
from bench.store import DEFAULT_STORAGE, MAX_RETRY, RequeueStaleTrials, open_storage, record_attributes
from bench.sweep_spec import SweepSpec, load_spec
from bench.tasks import TASKS
from bench.threads import use_threads
from bench.tracking import wandb_mode, wandb_settings

STARTING_SECONDS = 60  # a running trial names its worker within moments; one that never did is stale by then
PLACE_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


class SurplusTrial(Exception):
    """The study already had all its trials when this one started (a race between workers)."""


# --------------------------------------------------------------------------------------- W&B


def start_wandb_run(spec: SweepSpec, trial: optuna.Trial, config: dict, mode: str):
    """A Lightning WandbLogger over a run of this trial alone (finished by finish_wandb_run), and the mode it
    runs in, started here so that a failure is caught: online but unreachable, the run is kept offline for
    `wandb sync` (and the next trials start offline); W&B itself broken, the trial runs without it."""
    if mode == "disabled":
        return None, mode
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    init = dict(project=spec.project or os.environ.get("WANDB_PROJECT") or "bench", group=spec.study,
                job_type=config["model"], name=f"{spec.study}-{trial.number}", tags=[spec.study, config["corpus"]],
                config={**config, "study": spec.study, "trial": trial.number},
                settings=wandb_settings(),
                dir=os.environ.get("WANDB_DIR"))  # read per run: wandb's settings singleton keeps the first one
    for attempt in dict.fromkeys([mode, "offline"]):
        try:
            run = wandb.init(mode=attempt, **init)
        except Exception as error:  # noqa: BLE001 -- W&B trouble must not fail the trial
            print(f"W&B {attempt} run did not start: {redact(one_line(error))}", flush=True)
            continue
        # as WandbLogger does for the runs it starts: epoch metrics against the global step
        run.define_metric("trainer/global_step")
        run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
        trial.set_user_attr("wandb_run", run.id)
        return WandbLogger(experiment=run), attempt
    return None, mode


def finish_wandb_run(logger, state: str, summary: dict) -> None:
    """Put the trial's outcome in the run's summary (and tags when not complete) and finish the run."""
    if logger is None:
        return
    run = logger.experiment
    run.summary.update({"state": state, **plain(summary)})
    if state != "complete":
        run.tags = (*run.tags, state)
    run.finish(exit_code=1 if state == "failed" else 0)


# ---------------------------------------------------------------------------------- workers


def process_start(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) of a process from /proc, None where there is no /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], fields[19]


def this_worker(trial: optuna.Trial) -> dict:
    start = process_start(os.getpid())
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": start and start[1], "trial": trial.number}


def is_stale(trial: optuna.trial.FrozenTrial) -> bool:
    """A RUNNING trial whose worker process on this host is gone (or that never named its worker)."""
    worker = trial.user_attrs.get("worker") or {}
    if worker.get("trial") != trial.number:  # not named yet, or a requeued copy still naming the dead worker
        return time.time() - trial.datetime_start.timestamp() > STARTING_SECONDS
    if worker["host"] != socket.gethostname():
        return False  # another machine: the SQL heartbeat judges it
    try:
        os.kill(worker["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    process = process_start(worker["pid"])
    return process is not None and (process[0] == "Z" or process[1] != worker["started"])


def recover_dead_trials(study: optuna.Study, storage, max_retry: int) -> list[int]:
    """Fail the running trials whose worker is gone and requeue their parameters, at most `max_retry` times
    (as Optuna does for heartbeat-stale ones); returns their numbers. Only the worker whose state change
    succeeds requeues."""
    requeue = RequeueStaleTrials(max_retry)
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_stale(trial):
            continue
        try:
            if not storage.set_trial_state_values(trial_id(trial), TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first
        requeue(study, storage.get_trial(trial_id(trial)))
        recovered.append(trial.number)
    return recovered


def holds_place(trial: optuna.trial.FrozenTrial) -> bool:
    return trial.state in PLACE_STATES or (trial.state == TrialState.FAIL and "fail_reason" in trial.user_attrs)


def places_taken(study: optuna.Study, before: int | None = None) -> int:
    return sum(holds_place(t) for t in study.get_trials(deepcopy=False) if before is None or t.number < before)


def trials_to_run(study: optuna.Study, total: int) -> int:
    """The open places plus the queued trials (a requeued trial holds its place but still has to run)."""
    waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    return max(total - places_taken(study), 0) + waiting


class PruningCallback(PyTorchLightningPruningCallback):
    """optuna-integration's pruning callback (in one process it reports the epoch metric and raises
    TrialPruned from on_validation_end; check_pruned is for DDP), keeping the metrics it last saw for the
    trial's record. A non-finite metric is a diverged run: FloatingPointError (a failed trial), not pruning."""

    def __init__(self, trial: optuna.Trial, monitor: str):
        super().__init__(trial, monitor)
        self.last_metrics: dict = {}

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.last_metrics = {"epoch": trainer.current_epoch,
                             **{k: float(v) for k, v in trainer.callback_metrics.items()}}
        value = self.last_metrics.get(self.monitor)
        if value is not None and not math.isfinite(value):
            raise FloatingPointError(f"{self.monitor} became {value} at epoch {trainer.current_epoch}")
        super().on_validation_end(trainer, pl_module)


@dataclass
class Objective:
    spec: SweepSpec
    total: int
    data_dir: str | None
    wandb_mode: str
    progress: bool
    run_root: Path | None = None  # the trials' run folders go under run_root/<study>/ (None: temporary)
    keep: str = "best"

    def __call__(self, trial: optuna.Trial) -> float:
        self.claim_place(trial)
        logger, pruning = None, PruningCallback(trial, TASKS[self.spec.task].monitor)
        try:
            config = self.spec.config(self.spec.settings(trial))
            logger, self.wandb_mode = start_wandb_run(self.spec, trial, config, self.wandb_mode)
            run_dir, retry = self.run_dir(trial)
            # Only a retry goes on from its folder: a new trial whose folder holds files (a study of the same name
            # deleted and started again) starts afresh. A retry's worker killed after the record was written and
            # before the trial was told: not run again.
            record = (retry and finished_record(run_dir, config)) or run_experiment(
                config, data_dir=self.data_dir, logger=logger, callbacks=(pruning,), progress=self.progress,
                run_dir=run_dir, resume=retry, keep=self.keep)
            value = record.get(self.spec.metric)
            if value is None or not math.isfinite(value):
                raise FloatingPointError(f"{self.spec.metric} is {value} (diverged)")
        except optuna.TrialPruned:
            trial.set_user_attr("last_metrics", pruning.last_metrics)
            finish_wandb_run(logger, "pruned", pruning.last_metrics)
            raise
        except Interrupted:
            requeue_interrupted(trial)
            finish_wandb_run(logger, "interrupted", pruning.last_metrics)
            raise
        except Exception as error:
            reason = redact(one_line(error))
            trial.set_user_attr("fail_reason", reason)
            trial.set_user_attr("last_metrics", pruning.last_metrics)
            finish_wandb_run(logger, "failed", {"fail_reason": reason, **pruning.last_metrics})
            raise
        for key, attribute in record_attributes(record).items():
            trial.set_user_attr(key, attribute)
        finish_wandb_run(logger, "complete", record)
        return value

    def run_dir(self, trial: optuna.Trial) -> tuple[Path | None, bool]:
        """The trial's run folder, named after the trial it retries, if any, and whether it retries one: a
        requeued trial (its worker died, or a signal ended it) goes on from the checkpoints of the one it
        replaces."""
        if self.run_root is None:
            return None, False
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        origin = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
        folder = self.run_root / self.spec.study / f"trial-{trial.number if origin is None else origin}"
        return folder, origin is not None

    def claim_place(self, trial: optuna.Trial) -> None:
        trial.set_user_attr("worker", this_worker(trial))
        if places_taken(trial.study, before=trial.number) >= self.total:
            trial.set_user_attr("surplus", f"the study had its {self.total} trials when this one started")
            trial.study.stop()
            raise SurplusTrial(trial.user_attrs["surplus"])


def requeue_interrupted(trial: optuna.Trial) -> None:
    """Fail the trial a signal stopped and queue its parameters again, as for a dead worker's trial: the next
    command runs the copy, which resumes from this trial's run folder. The trial holds no place (no
    fail_reason); its copy does."""
    storage = trial_storage(trial)
    if storage.set_trial_state_values(trial_id(trial), TrialState.FAIL):
        RequeueStaleTrials(max_retry=None)(trial.study, storage.get_trial(trial_id(trial)))


def describe(trial: optuna.trial.FrozenTrial, metric: str) -> str:
    attrs = trial.user_attrs
    if trial.state == TrialState.COMPLETE:
        speed = RunRecord.from_dict(attrs.get("record") or {}).speed
        cut = speed.get("stopped_by") == "max_minutes"
        return (f"{metric} {trial.value:.2f}"
                + (f", cut by the minutes budget at epoch {speed['epochs']}" if cut else "")
                + (", retried from epoch 0: no checkpoint in its run folder" if speed.get("resume_found_no_checkpoint")
                   else ""))
    if trial.state == TrialState.PRUNED:
        last = attrs.get("last_metrics") or {}
        figures = " ".join(f"{k} {v:.2f}" for k, v in last.items() if k != "epoch")
        return f"pruned at epoch {last.get('epoch')}" + (f" ({figures})" if figures else "")
    if trial.state == TrialState.FAIL:
        return attrs.get("fail_reason") or attrs.get("surplus") or "stopped before the end (killed or interrupted)"
    return ""


@dataclass
class Worker:
    """One process's optimisation loop over the shared study (picklable, for --n-jobs worker processes)."""

    spec: SweepSpec
    storage_url: str | None
    objective: Objective
    init: object = None  # called first in a worker process (the CLI's quiet_libraries)
    workers: int = 1  # processes sharing this machine's cores
    max_retry: int = MAX_RETRY

    def __call__(self, index: int) -> None:
        if self.init is not None:
            self.init()
        use_threads(self.workers)
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures are reported by report_trial, one line
        storage = open_storage(self.storage_url, heartbeat=True, max_retry=self.max_retry)
        seed_salt = (len(optuna.load_study(study_name=self.spec.study, storage=storage).trials), index)
        study = optuna.load_study(study_name=self.spec.study, storage=storage,
                                  sampler=self.spec.make_sampler(seed_salt), pruner=self.spec.make_pruner())
        if trials_to_run(study, self.objective.total):
            study.optimize(self.objective, callbacks=[self.report_trial, self.stop_when_full], catch=(Exception,),
                           gc_after_trial=True)

    def report_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
        seconds = trial.duration.total_seconds() if trial.duration else 0
        # one write of the whole line: the workers share this stream, and print's two writes (the text, then
        # the newline) let another worker's line fall between them
        sys.stdout.write(f"trial {trial.number} {trial.state.name}: {describe(trial, self.spec.metric)} | {params} | "
                         f"{seconds:.0f} s\n")
        sys.stdout.flush()

    def stop_when_full(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if not trials_to_run(study, self.objective.total):
            study.stop()


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them: its entries where it is set (an entry
    naming no GPU hides it from the worker as from this process), else 0, 1, ... as many as torch counts
    through NVML, which leaves CUDA uninitialised for the forked workers."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [name.strip() for name in listed.split(",") if name.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def worker_devices(n_jobs: int, visible: list[str]) -> list[str | None]:
    """The GPU each of `n_jobs` workers sees: worker i visible GPU i, round-robin when workers outnumber GPUs;
    None (left as it is) without GPUs."""
    return [visible[i % len(visible)] if visible else None for i in range(n_jobs)]


def take_device(devices) -> None:
    """A worker process's initializer: it takes the next device of the queue `devices` (worker_devices) and sees
    only that GPU, set before anything in the process initialises CUDA."""
    device = devices.get()
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device


# ------------------------------------------------------------------------------------------ study


def open_study(spec: SweepSpec, storage) -> optuna.Study:
    """The spec's study, created or resumed; a study of that name made from another spec is a user error."""
    study = optuna.create_study(study_name=spec.study, storage=storage, direction=spec.direction,
                                load_if_exists=True)
    made_from = study.user_attrs.get("spec")
    if made_from is None:
        study.set_user_attr("spec", spec.definition)
    elif not same_study(made_from, spec.definition):
        raise BenchError(f"study {spec.study!r} exists with another spec (only trials, project, max_retry and "
                         f"pruner may change on resume); give this spec another study name")
    return study


def same_study(stored: str, definition: str) -> bool:
    """Whether a stored study's definition and a spec's describe one study. The pruner may change on resume:
    it decides when to stop a trial, not what a trial is, and a study can learn it was too eager: under the
    rnnlm schedule the early epochs rank recipes badly (tune-rnn-bptt-ptb's best trial was at valid 340 after
    two epochs, against 301, and ended at 150, against 178). Studies stored before this rule hold a pruner."""
    def identity(text: str) -> dict:
        return {k: v for k, v in json.loads(text).items() if k != "pruner"}
    return identity(stored) == identity(definition)


def trials_table(study: optuna.Study, metric: str) -> pd.DataFrame:
    """One row per trial: number, state, the metric, the parameters, seconds, and what happened."""
    rows = [{"trial": t.number, "state": t.state.name, metric: t.value,
             **{k: v for k, v in t.params.items()},
             "seconds": t.duration.total_seconds() if t.duration else None,
             "note": "" if t.state == TrialState.COMPLETE else describe(t, metric)} for t in study.trials]
    return pd.DataFrame(rows)


def warn_if_minutes_cut_epochs(spec: SweepSpec, storage) -> None:
    """Say so when the budget's minutes will stop trials before its epochs: the minutes per epoch of the
    stored runs of the spec's model on its corpus (median, any study) times its epochs exceed its minutes."""
    epochs, minutes = spec.budget.get("max_epochs"), spec.budget.get("max_minutes")
    if not (epochs and minutes):
        return
    per_epoch = [record.minutes_per_epoch for summary in optuna.get_all_study_summaries(storage)
                 for trial in optuna.load_study(study_name=summary.study_name, storage=storage).get_trials(
                     deepcopy=False, states=(TrialState.COMPLETE,))
                 if (record := RunRecord.from_dict(trial.user_attrs.get("record") or {})).run.get("model") == spec.model
                 and record.run.get("corpus") == spec.corpus and record.minutes_per_epoch]
    if per_epoch and epochs * statistics.median(per_epoch) > minutes:
        print(f"warning: {spec.path}: budget epochs {epochs} take about {epochs * statistics.median(per_epoch):.3g} "
              f"minutes here ({statistics.median(per_epoch):.3g} an epoch, the median of {len(per_epoch)} stored "
              f"runs of {spec.model} on {spec.corpus}), but minutes {minutes:g} stop each trial at about epoch "
              f"{minutes / statistics.median(per_epoch):.2g}", flush=True)


def check_runnable(spec: SweepSpec, total: int, n_jobs: int, max_retry: int, data_dir: str | None) -> None:
    """The command's options, and the corpus, fit the spec: checked before the study is touched."""
    if total < 1 or n_jobs < 1:
        raise BenchError("--trials and --n-jobs must be positive")
    if max_retry < 0:
        raise BenchError(f"--max-retry must not be negative, got {max_retry}")
    if spec.grid_size is not None and total > spec.grid_size:
        raise BenchError(f"--trials {total}: the grid of {spec.path} has {spec.grid_size} points")
    # A DDP trial's every process would run the whole sweep, each asking Optuna for a trial of its own
    searched = [spec.search, spec.grid_space, *spec.grid_points.values()]
    for key in ("devices", "num_nodes"):
        if spec.fixed.get(key, 1) != 1 or any(key in chosen for chosen in searched):
            raise BenchError(f"{spec.path}: {key}: a sweep's trials run on one device each")
    # a missing corpus, or a setting it cannot take (more classes than words)
    if spec.task == "tagging":
        cached_tagged_corpus(spec.corpus, data_dir)
    else:
        load_spec(spec.path, vocab_size=len(cached_corpus(spec.corpus, data_dir).vocab))


def run_sweep(spec: SweepSpec, trials: int | None = None, storage_url: str | None = None, n_jobs: int = 1,
              data_dir: str | None = None, use_wandb: bool = True, progress: bool = True,
              worker_init=None, run_root: Path | None = None, keep: str = "best",
              max_retry: int | None = None) -> pd.DataFrame:
    """Run (or resume) the spec's study until it holds `trials` trials (default: the spec's), a trial whose
    worker died run again at most `max_retry` times (default: the spec's); return the trials table."""
    total = spec.trials if trials is None else trials
    max_retry = spec.max_retry if max_retry is None else max_retry
    data_dir = str(data_dir) if data_dir else None
    check_runnable(spec, total, n_jobs, max_retry, data_dir)
    storage = open_storage(storage_url, heartbeat=True, max_retry=max_retry)
    for warning in sharing_warnings(storage_url, run_root):
        print(f"bench: warning: {warning}", file=sys.stderr, flush=True)
    study = open_study(spec, storage)
    with warnings.catch_warnings():  # experimental since Optuna 2.9, unchanged since: not the user's business
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # SQL: trials whose heartbeat stopped, failed and requeued
    recovered = recover_dead_trials(study, storage, max_retry)
    if recovered:
        print(f"trials {', '.join(map(str, recovered))}: their worker is gone; failed and requeued", flush=True)
    mode = wandb_mode(use_wandb)
    owed = trials_to_run(study, total)
    if owed:
        warn_if_minutes_cut_epochs(spec, storage)
    print(f"study {spec.study} in {redact(storage_url or DEFAULT_STORAGE)}: {min(places_taken(study), total)} of "
          f"{total} trials held, {owed} to run; W&B {mode}"
          + (" (no login: runs kept in ./wandb or $WANDB_DIR; `wandb sync` uploads them)" if mode == "offline"
             else ""), flush=True)
    objective = Objective(spec, total, data_dir, mode, progress and n_jobs == 1, run_root, keep)
    worker = Worker(spec, storage_url, objective, worker_init, min(n_jobs, max(owed, 1)), max_retry)
    if owed > 0 and n_jobs == 1:
        worker(0)
    elif owed > 0:
        # fork: the workers inherit the imported libraries and the loaded corpus (spawn re-imports torch and
        # Lightning, ~7 s a worker here); nothing has run torch or W&B in this process yet.
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        processes, devices = min(n_jobs, owed), context.SimpleQueue()
        for device in worker_devices(processes, visible_gpus()):  # one a process: the initializer runs once in each
            devices.put(device)
        with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context, initializer=take_device,
                                                    initargs=(devices,)) as pool:
            try:
                list(pool.map(worker, range(processes)))
            except Interrupted as stop:  # a signal to this process alone: the workers requeue their trials too
                for process in multiprocessing.active_children():  # the pool's workers: nothing else here forks
                    os.kill(process.pid, stop.signal_number)
                raise
    return trials_table(study, spec.metric)
