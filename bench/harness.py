"""One run = one record: train a model from a validated configuration with Lightning and measure it.

The record holds the module's `results` -- perplexities (train of the last epoch, valid of the best
checkpoint, test), or for taggers F1, precision, recall and token accuracy --, the speed figures of
Mikolov et al. 2011's Table 3 (training tokens per second and minutes per epoch, training steps only --
validation excluded; seconds to score the test set), parameter count, peak memory, device, seed, commit,
library versions and the full configuration.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import platform
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, Timer
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from bench.callbacks import EpochLines, RandomStates, SpeedMonitor
from bench.config import TRAINER_DEFAULTS, model_arguments
from bench.data import Corpus, LanguageModelData, load_corpus
from bench.errors import BenchError, one_line
from bench.interpolation import tune_interpolation
from bench.models.kneser_ney import KneserNey
from bench.models.plugins import model_spec
from bench.records import RunRecord, plain, read_json, remove_orphaned_temporaries, write_atomically
from bench.schedules import schedule_callbacks
from bench.tagging import TaggedCorpus, TaggingData, load_tagged_corpus


@functools.lru_cache(maxsize=4)
def cached_corpus(name: str, data_dir: str | None) -> Corpus:
    return load_corpus(name, data_dir)


@functools.lru_cache(maxsize=2)
def cached_tagged_corpus(name: str, data_dir: str | None) -> TaggedCorpus:
    return load_tagged_corpus(name, data_dir)


def build(config: dict, data_dir: str | None) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    """The configured model and the batches of its corpus."""
    spec = model_spec(config["model"])
    arguments = model_arguments(config)
    if spec.task == "tagging":
        corpus = cached_tagged_corpus(config["corpus"], data_dir)
        return (spec.module(len(corpus.words), corpus.tags, **arguments),
                TaggingData(corpus, config["batch_size"]))
    corpus = cached_corpus(config["corpus"], data_dir)
    return (spec.module(corpus.vocab, **arguments),
            LanguageModelData(corpus, config["batch_size"], config["bptt"], config["eval_batch_size"]))


@functools.lru_cache(maxsize=4)
def kneser_ney_log_probs(corpus_name: str, data_dir: str | None, order: int) -> dict[str, np.ndarray]:
    """Per-token log p of the valid and test splits under a Kneser-Ney model of the training split."""
    corpus = cached_corpus(corpus_name, data_dir)
    estimator = KneserNey(order, len(corpus.vocab), corpus.vocab.eos).fit(corpus.splits["train"])
    return {split: estimator.log_prob_stream(corpus.splits[split]) for split in ("valid", "test")}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except OSError:
        return None


def library_versions() -> dict:
    import lightning
    import optuna

    return {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
            "optuna": optuna.__version__, "numpy": np.__version__}


PROC_STATUS, PROC_CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak_memory() -> None:
    """Start this run's peak memory from the current use: a sweep runs its trials in one process, and the
    process's lifetime peak would give every trial the largest trial's figure (Linux: writing 5 to
    clear_refs resets VmHWM; elsewhere the figure stays the process's peak)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        PROC_CLEAR_REFS.write_text("5")
    except OSError:
        pass


def peak_memory_mb(device: str) -> float:
    """Peak GPU memory allocated on CUDA; on CPU the peak resident set size since reset_peak_memory (VmHWM),
    or the process's peak where /proc has no VmHWM."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        status = PROC_STATUS.read_text()
    except OSError:
        status = ""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class DurableCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoints (torch.save), written by bench.records.write_atomically: Lightning's own write
    (fsspec's transaction, a temporary file moved into place) flushes nothing to disk, so a power loss soon
    after it can leave an empty or partial last.ckpt where the previous good one was."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_atomically(Path(path), buffer.getbuffer())


def trainer_settings(config: dict) -> dict:
    """The Trainer's accelerator, devices, num_nodes, strategy and precision of `config` (bench.config.TRAINER).
    A model without gradient steps (the n-gram) counts on the CPU whatever they say: its estimator works on
    numpy arrays, and a device would only copy every chunk there and back."""
    if not model_spec(config["model"]).neural:
        return {**TRAINER_DEFAULTS, "accelerator": "cpu"}
    return {key: config.get(key, default) for key, default in TRAINER_DEFAULTS.items()}


def set_matmul_precision(trainer: pl.Trainer) -> None:
    """TF32 for fp32 matrix products where the device has it (CUDA, compute capability 8.0 and up): fp32's
    range with a 10-bit mantissa, several times the fp32 throughput; the perplexities are still summed in
    float64. Full fp32 everywhere else, the CPU included -- the setting is process-wide, and on a CPU with
    bf16 units oneDNN may take "high" as leave to round the fp32 products the CPU figures were measured with."""
    device = trainer.strategy.root_device
    tf32 = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
    torch.set_float32_matmul_precision("high" if tf32 else "highest")


def build_trainer(config: dict, callbacks: list, logger=None, progress: bool = True,
                  checkpoint_dir: str | None = None) -> pl.Trainer:
    """The Trainer of `config`. use_distributed_sampler=False: Lightning's DistributedSampler would deal the
    stream chunks to the processes of a DDP run in turn, and a recurrent state would then carry across
    chunks that do not follow each other; bench.data gives each process its own streams instead."""
    settings = trainer_settings(config)
    try:
        trainer = pl.Trainer(
            **settings, use_distributed_sampler=False, max_epochs=config["max_epochs"],
            limit_train_batches=config.get("limit_train_batches") or None,
            max_time=timedelta(minutes=config["max_minutes"]),
            gradient_clip_val=config.get("clip") or None, deterministic=True, num_sanity_val_steps=0,
            callbacks=callbacks, logger=logger if logger is not None else False, enable_progress_bar=progress,
            enable_model_summary=False, default_root_dir=checkpoint_dir, plugins=[DurableCheckpointIO()],
        )
    except MisconfigurationException as error:  # a device this machine lacks
        message = str(error).strip().splitlines()[0]
        raise BenchError(f"accelerator={settings['accelerator']}, devices={settings['devices']}: {message}",
                         "accelerator") from None
    set_matmul_precision(trainer)
    return trainer


def check_devices(config: dict) -> None:
    """A user error now, before anything is written, when this machine lacks the devices `config` asks for."""
    build_trainer(config, [], progress=False)


def is_worker_process(config: dict) -> bool:
    """Whether this process is one of a DDP run's other than its global rank 0 (Lightning's rank: from the
    environment the run's processes start with, then the strategy's). Each process runs the whole command;
    a worker trains and scores as rank 0 does but writes nothing, so that the run has one record and one
    trial. Never for a one-process run, whatever the environment says (a SLURM task of an array job)."""
    settings = trainer_settings(config)
    return settings["devices"] * settings["num_nodes"] > 1 and rank_zero_only.rank != 0


# --------------------------------------------------------------------------------------------------------
# Run folders
#
# A run keeps its checkpoints in a folder that outlives the process (bench.runs names them):
#
#     config.json   the configuration the checkpoints belong to
#     last.ckpt     after every epoch: weights, optimizer, schedule, loops, callbacks (clock, curve, RNG)
#     best.ckpt     the best validation epoch's (what the test pass scores)
#     record.json   the finished run's record, written last
#
# Every file is written whole or not at all (bench.records.write_atomically). A resumed run goes on from the
# newest of its checkpoints that loads, normally last.ckpt; one that does not (a copy of the folder cut
# short, a disk that lost it) is named in a warning and stepped over, down to epoch 0. Checkpoints of another
# configuration are never resumed. A finished run keeps the checkpoints `keep` names.
# --------------------------------------------------------------------------------------------------------

CHECKPOINTS = {"best": ("best.ckpt",), "last": ("last.ckpt",), "all": ("best.ckpt", "last.ckpt"), "none": ()}


def run_folder_name(config: dict) -> str:
    """The folder name of a run of `config`: model and seed, and a digest of the whole configuration."""
    digest = hashlib.sha256(json.dumps(plain(config), sort_keys=True).encode()).hexdigest()[:10]
    return f"{config['model']}-seed{config['seed']}-{digest}"


def prepare_run_dir(run_dir: Path, config: dict, resume: bool) -> tuple[str | None, dict | None]:
    """The checkpoint to resume from (None: a fresh start, the folder emptied of earlier checkpoints), and the
    recovery made on the way, None when no checkpoint was damaged: {"damaged": the checkpoints that do not
    load, "checkpoint": the one resumed from (None: epoch 0), "epoch": the epochs it holds}."""
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_orphaned_temporaries(run_dir)
    config_file, recovery, damaged = run_dir / "config.json", None, {}
    if resume and read_json(config_file) == plain(config):
        loaded = {}
        for name in ("last.ckpt", "best.ckpt"):  # last first: it wins a tie
            if (run_dir / name).is_file():
                try:
                    state = torch.load(run_dir / name, map_location="cpu", weights_only=True)
                    loaded[name] = (state["global_step"], state["epoch"] + 1)
                except Exception as error:  # noqa: BLE001 -- torch raises any of a dozen types on damaged bytes
                    damaged[name] = one_line(error)
        newest = max(loaded, key=lambda name: loaded[name][0], default=None)
        if damaged:
            recovery = {"damaged": list(damaged), "checkpoint": newest, "epoch": loaded[newest][1] if newest else 0}
            print(f"bench: warning: {run_dir}: "
                  + "; ".join(f"{name} does not load ({reason})" for name, reason in damaged.items())
                  + (f"; going on from {newest} (epoch {recovery['epoch']})" if newest else
                     "; starting again from epoch 0"), file=sys.stderr, flush=True)
        if newest:
            return str(run_dir / newest), recovery
    if resume and not damaged:  # damaged checkpoints were named above, with the restart
        print(f"bench: warning: {run_dir}: no checkpoint of this configuration to resume from; starting from "
              "epoch 0", file=sys.stderr, flush=True)
    for name in ("last.ckpt", "best.ckpt", "record.json"):
        (run_dir / name).unlink(missing_ok=True)
    write_atomically(config_file, json.dumps(plain(config), indent=1, sort_keys=True))
    return None, recovery


def finished_record(run_dir: Path, config: dict) -> dict | None:
    """The record of a finished run of `config` in `run_dir`, if there is one."""
    record = read_json(run_dir / "record.json") if read_json(run_dir / "config.json") == plain(config) else None
    return RunRecord.from_dict(record).to_dict() if record is not None else None


def stopped_by(trainer: pl.Trainer, config: dict, callbacks: list) -> str:
    """What ended the training: "schedule" when the run reached its own stopping point (its schedule ended
    it, or it ran a fixed-length recipe's epochs: zaremba's, the n-gram's single pass), else the budget that
    cut it short ("max_epochs", "max_minutes", "limit_train_batches")."""
    if any(getattr(c, "finished", False) or getattr(c, "stopped_epoch", 0) for c in callbacks):
        return "schedule"  # RnnlmSchedule finished, or EarlyStopping stopped
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    if timer is not None and timer.time_remaining("train") <= 0:
        return "max_minutes"
    if config.get("limit_train_batches"):
        return "limit_train_batches"
    return "schedule" if config.get("schedule", "zaremba") == "zaremba" else "max_epochs"


def minutes_to_target(curve: list[tuple[int, float, float]], targets: list[float]) -> dict[str, float | None]:
    """Per target perplexity, the wall minutes to the first validation at or under it (None: never)."""
    return {f"{target:g}": next((seconds / 60 for _, seconds, value in curve if value <= target), None)
            for target in targets}


@dataclass
class FinishedFit:
    """What a fitted and tested run leaves for its record."""

    model: pl.LightningModule
    data: pl.LightningDataModule
    trainer: pl.Trainer
    speed: SpeedMonitor
    stopped_by: str


def run_experiment(config: dict, data_dir: str | None = None, logger=None, callbacks: tuple = (),
                   progress: bool = True, run_dir: Path | None = None, resume: bool = False,
                   keep: str = "best") -> dict | None:
    """Train and evaluate one validated configuration (bench.config.make_config); return its record.

    `run_dir` keeps the checkpoints (see Run folders above; None: a temporary folder), made absolute so that
    the record names it wherever it is read; with `resume`, an interrupted run of the same configuration
    there goes on from its last completed epoch. A DDP run's worker processes return None (is_worker_process)."""
    commit = git_commit()  # the code that starts the run (a run going on across commits keeps its first)
    # Subnormal floats take the CPU's slow path: Adam's moments of words unseen for a few hundred steps decay
    # into them (PTB, class-100 RNN, 32 streams: an epoch went from 3 to over 13 minutes, all in Adam.step).
    torch.set_flush_denormal(True)
    pl.seed_everything(config["seed"], verbose=False)
    reset_peak_memory()
    data_dir = str(data_dir) if data_dir else None
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as temporary:
        folder = Path(run_dir).resolve() if run_dir is not None else Path(temporary)
        label = folder.name if run_dir is not None else config["model"]
        fit = fit_and_test(config, data_dir, folder, label, logger, callbacks, progress, resume)
    if is_worker_process(config):
        return None
    record = RunRecord(run={"model": config["model"], "corpus": config["corpus"]},
                       quality=quality_figures(fit, config, data_dir), speed=speed_figures(fit),
                       provenance=provenance(fit, config, commit, folder if run_dir is not None else None)).to_dict()
    if run_dir is not None:
        write_atomically(folder / "record.json", json.dumps(plain(record), indent=1))
        for name in {"best.ckpt", "last.ckpt"} - set(CHECKPOINTS[keep]):
            (folder / name).unlink(missing_ok=True)
    return record


def fit_and_test(config: dict, data_dir: str | None, folder: Path, label: str, logger, callbacks: tuple,
                 progress: bool, resume: bool) -> FinishedFit:
    """Build the model, fit it (resuming from `folder` when `resume` finds its checkpoint) and test the best
    epoch's weights; with NN+KN, validate them again for the per-token scores."""
    model, data = build(config, data_dir)
    if config.get("init_range"):
        model.init_uniform(config["init_range"])
    resume_from, recovery = prepare_run_dir(folder, config, resume)
    speed = SpeedMonitor(model.MONITOR, recovery, no_checkpoint=resume and resume_from is None)
    checkpoint = ModelCheckpoint(dirpath=folder, filename="best", monitor=model.MONITOR, mode=model.MODE,
                                 enable_version_counter=False)
    # Every epoch's state, in a checkpoint of its own: ModelCheckpoint's save_last writes only when the
    # monitored metric improved, so a resume would repeat the epochs since the last improvement.
    last = ModelCheckpoint(dirpath=folder, filename="last", enable_version_counter=False)
    schedule = schedule_callbacks(config, model.MONITOR, model.MODE)
    lines = [] if progress else [EpochLines(speed, label)]
    trainer = build_trainer(config, [speed, *lines, RandomStates(), *schedule, checkpoint, last, *callbacks],
                            logger, progress, str(folder))
    trainer.fit(model, datamodule=data, ckpt_path=resume_from)
    # The best epoch's weights; a model without gradient steps (the n-gram) has no checkpoint. The weights
    # alone: trainer.test(ckpt_path=...) would also restore the callbacks' and the module's state of that
    # epoch, dropping the later epochs from the clock and the curve.
    if checkpoint.best_model_path:
        model.load_state_dict(torch.load(checkpoint.best_model_path, weights_only=True)["state_dict"])
    if config.get("kn_order"):  # per-token scores of the best weights on valid and test, for NN+KN
        trainer.validate(model, datamodule=data, verbose=False)
    trainer.test(model, datamodule=data, verbose=False)
    return FinishedFit(model, data, trainer, speed, stopped_by(trainer, config, schedule))


def quality_figures(fit: FinishedFit, config: dict, data_dir: str | None) -> dict:
    """The module's results; for a language model also NN+KN (with kn_order), the test set's oracle and
    unigram perplexities, and the minutes to each target perplexity."""
    model, figures = fit.model, fit.model.results(len(fit.speed.train_seconds))
    if not isinstance(fit.data, LanguageModelData):
        return figures
    if config.get("kn_order"):
        kn = kneser_ney_log_probs(config["corpus"], data_dir, config["kn_order"])
        figures |= tune_interpolation(valid=(-model.scored_token_nll("val"), kn["valid"]),
                                      test=(-model.scored_token_nll("test"), kn["test"]))
    corpus = fit.data.corpus
    return figures | {"oracle_ppl": corpus.oracle_perplexity("test"), "unigram_ppl": corpus.unigram_perplexity("test"),
                      "minutes_to_target": minutes_to_target(fit.speed.curve, config.get("target_ppl") or [])}


def speed_figures(fit: FinishedFit) -> dict:
    """Epochs trained (a fraction when a budget cut the last one short), what stopped the run, and the speed
    figures of the training steps (the raw counts: tokens and seconds), the wall clock, the validation curve and
    the test pass."""
    speed, trained = fit.speed, len(fit.speed.train_seconds)
    batches_per_epoch = fit.trainer.num_training_batches
    epochs = speed.train_batches / batches_per_epoch if batches_per_epoch else trained
    return {
        # whole epochs, or the fraction trained when a budget cut the last one short
        "epochs": trained if speed.train_batches == trained * batches_per_epoch else round(epochs, 3),
        "train_tokens": speed.train_tokens,
        "train_seconds": sum(speed.train_seconds),
        "training_flops_per_token": getattr(fit.model, "training_flops_per_token", lambda: None)(),
        "stopped_by": fit.stopped_by,
        "wall_minutes": speed.wall_seconds() / 60,
        "curve": [{"epoch": epoch, "wall_minutes": seconds / 60, fit.model.MONITOR: value}
                  for epoch, seconds, value in speed.curve],
        "resumed": speed.resumed,
        "recovered_from": speed.recovered_from,
        "resume_found_no_checkpoint": speed.resume_found_no_checkpoint,
        "test_seconds": speed.test_seconds,
    }


def provenance(fit: FinishedFit, config: dict, commit: str | None, run_dir: Path | None) -> dict:
    """What ran, on what: parameter count, peak memory, device (rank 0's), the devices of the run (every
    process's, all nodes), the precision Lightning trained in (on CPU it runs 16-mixed as bf16-mixed) and that
    of fp32 matrix products, threads, the run folder (absolute; None: a temporary one), seed, commit, library
    versions, the configuration, and a plugin's name, source and version."""
    model, device = fit.model, str(fit.model.device)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "peak_memory_mb": peak_memory_mb(device),
        "device": device,
        "devices": fit.trainer.world_size,
        "precision": fit.trainer.precision,
        "matmul_precision": torch.get_float32_matmul_precision(),
        "threads": torch.get_num_threads(),
        "run_dir": str(run_dir) if run_dir is not None else None,
        "seed": config["seed"],
        "git_commit": commit,
        "versions": library_versions(),
        "config": config,
        **({"plugin": plugin} if (plugin := model_spec(config["model"]).plugin) else {}),
    }
