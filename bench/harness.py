"""One run = one record: train a model from a validated configuration with Lightning and measure it.

The record holds the module's `results` -- perplexities (train of the last epoch, valid of the best
checkpoint, test), or for taggers F1, precision, recall and token accuracy --, the speed figures of
Mikolov et al. 2011's Table 3 (training tokens per second and minutes per epoch, training steps only --
validation excluded; seconds to score the test set), parameter count, peak memory, device, seed, commit,
library versions and the full configuration.
"""

from __future__ import annotations

import functools
import platform
import resource
import subprocess
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from bench.config import model_arguments
from bench.data import Corpus, LanguageModelData, load_corpus
from bench.interpolation import tune_interpolation
from bench.models import REGISTRY
from bench.models.kneser_ney import KneserNey
from bench.tagging import TaggedCorpus, TaggingData, load_tagged_corpus


class SpeedMonitor(pl.Callback):
    """Times the training steps (forward, backward, update) and the scoring of the test set."""

    def __init__(self):
        self.train_seconds: list[float] = []  # per completed epoch
        self.train_tokens = 0
        self.test_seconds = 0.0
        self._epoch_seconds = 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self._epoch_seconds = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._epoch_seconds += time.perf_counter() - self._batch_start
        self.train_tokens += int(batch[2].sum())  # the mask of a stream batch, the lengths of a sentence batch

    def on_train_epoch_end(self, trainer, pl_module):
        self.train_seconds.append(self._epoch_seconds)

    def on_test_epoch_start(self, trainer, pl_module):
        self._test_start = time.perf_counter()

    def on_test_end(self, trainer, pl_module):
        # not on_test_epoch_end: callbacks' epoch-end hooks run before the module's, which joins the streams
        self.test_seconds = time.perf_counter() - self._test_start


@functools.lru_cache(maxsize=4)
def cached_corpus(name: str, data_dir: str | None) -> Corpus:
    return load_corpus(name, data_dir)


@functools.lru_cache(maxsize=2)
def cached_tagged_corpus(name: str, data_dir: str | None) -> TaggedCorpus:
    return load_tagged_corpus(name, data_dir)


def build(config: dict, data_dir: str | None) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    """The configured model and the batches of its corpus."""
    spec = REGISTRY[config["model"]]
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


def build_trainer(config: dict, callbacks: list, logger=None, progress: bool = True,
                  checkpoint_dir: str | None = None) -> pl.Trainer:
    return pl.Trainer(
        accelerator="auto", devices=1, max_epochs=config["max_epochs"],
        limit_train_batches=config.get("limit_train_batches") or None,
        max_time=timedelta(minutes=config["max_minutes"]),
        gradient_clip_val=config.get("clip") or None, deterministic=True, num_sanity_val_steps=0,
        callbacks=callbacks, logger=logger if logger is not None else False, enable_progress_bar=progress,
        enable_model_summary=False, default_root_dir=checkpoint_dir,
    )


def run_experiment(config: dict, data_dir: str | None = None, logger=None, callbacks: tuple = (),
                   progress: bool = True) -> dict:
    """Train and evaluate one validated configuration (bench.config.make_config); return its record."""
    pl.seed_everything(config["seed"], verbose=False)
    reset_peak_memory()
    data_dir = str(data_dir) if data_dir else None
    model, data = build(config, data_dir)
    speed = SpeedMonitor()
    interpolate = bool(config.get("kn_order"))
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as checkpoint_dir:
        checkpoint = ModelCheckpoint(dirpath=checkpoint_dir, monitor=model.MONITOR, mode=model.MODE,
                                     save_weights_only=True)
        # The first epoch without improvement halves the learning rate (the module's scheduler); training
        # stops after `patience` more, so the halved rate is always tried (Mikolov's schedule).
        stopping = EarlyStopping(monitor=model.MONITOR, mode=model.MODE, patience=config["patience"] + 1,
                                 check_finite=True)
        trainer = build_trainer(config, [speed, checkpoint, stopping, *callbacks], logger, progress, checkpoint_dir)
        trainer.fit(model, datamodule=data)
        # The best epoch's weights; a model without gradient steps (the n-gram) has no checkpoint.
        best = "best" if checkpoint.best_model_path else None
        if interpolate:  # per-token scores of the best weights on valid and test, for NN+KN
            trainer.validate(model, datamodule=data, ckpt_path=best, verbose=False)
        trainer.test(model, datamodule=data, ckpt_path=best, verbose=False)
    record = {"model": config["model"], "corpus": config["corpus"], **model.results(len(speed.train_seconds))}
    if isinstance(data, LanguageModelData):
        corpus = data.corpus
        if interpolate:
            kn = kneser_ney_log_probs(config["corpus"], data_dir, config["kn_order"])
            record |= tune_interpolation(valid=(-model.scored_token_nll("val"), kn["valid"]),
                                         test=(-model.scored_token_nll("test"), kn["test"]))
        record |= {"oracle_ppl": corpus.oracle_perplexity("test"), "unigram_ppl": corpus.unigram_perplexity("test")}
    device = str(model.device)
    return record | {
        "epochs": len(speed.train_seconds),
        "tokens_per_second": speed.train_tokens / max(sum(speed.train_seconds), 1e-9),
        "minutes_per_epoch": float(np.mean(speed.train_seconds)) / 60,
        "test_seconds": speed.test_seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
        "peak_memory_mb": peak_memory_mb(device),
        "device": device,
        "seed": config["seed"],
        "git_commit": git_commit(),
        "versions": library_versions(),
        "config": config,
    }
