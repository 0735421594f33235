"""The harness's Lightning callbacks: the run's clock and token counts (SpeedMonitor), a line an epoch
where no progress bar shows (EpochLines), and the random generators' states in every checkpoint
(RandomStates)."""

from __future__ import annotations

import random
import time

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn


class SpeedMonitor(pl.Callback):
    """Times the training steps (forward, backward, update), the run's wall clock and the scoring of the test
    set; keeps the validation curve.

    The wall clock (time to target, MLPerf's rule) runs from the start of training -- the data loaded --
    through every training and validation epoch; the test pass is timed apart. Its figures go into the
    checkpoints, so a resumed run counts the epochs it trained in every process, and not the time lost
    between its last checkpoint and the interruption. The run's history goes with them: how often it was
    resumed, the damaged checkpoints it stepped over (`recovery`: this process's, see prepare_run_dir), and
    whether a resume found no checkpoint to go on from (`no_checkpoint`: this process's), so that it trained
    from epoch 0 again (a requeued sweep trial whose run folder is gone, or was never written).
    """

    def __init__(self, monitor: str, recovery: dict | None = None, no_checkpoint: bool = False):
        self.monitor = monitor
        self.train_seconds: list[float] = []  # per completed epoch
        self.train_batches = 0
        self.train_tokens = 0
        self.curve: list[tuple[int, float, float]] = []  # (epoch, wall seconds so far, validation metric)
        self.resumed = 0
        self.recovery = recovery
        self.recovered_from = [recovery] if recovery else []
        self.resume_found_no_checkpoint = no_checkpoint
        self.test_seconds = 0.0
        self._epoch_tokens = 0  # this process's; every process's are added at the epoch's end
        self._wall_before = 0.0  # wall seconds of earlier processes, up to the checkpoint resumed from
        self._wall_start = self._epoch_seconds = 0.0

    def state_dict(self) -> dict:
        return {"train_seconds": self.train_seconds, "train_batches": self.train_batches,
                "train_tokens": self.train_tokens, "curve": self.curve, "resumed": self.resumed,
                "recovered_from": self.recovered_from, "wall_seconds": self.wall_seconds(),
                "resume_found_no_checkpoint": self.resume_found_no_checkpoint}

    def load_state_dict(self, state_dict: dict) -> None:
        self.train_seconds, self.train_batches = state_dict["train_seconds"], state_dict["train_batches"]
        self.train_tokens, self.curve = state_dict["train_tokens"], [tuple(p) for p in state_dict["curve"]]
        self.resumed, self._wall_before = state_dict["resumed"] + 1, state_dict["wall_seconds"]
        # .get: checkpoints written before recoveries were recorded
        self.recovered_from = [*state_dict.get("recovered_from", []), *([self.recovery] if self.recovery else [])]
        # this process resumed, so an earlier one's restart from epoch 0 is the run's (.get: older checkpoints)
        self.resume_found_no_checkpoint = state_dict.get("resume_found_no_checkpoint", False)

    def wall_seconds(self) -> float:
        return self._wall_before + (time.perf_counter() - self._wall_start if self._wall_start else 0.0)

    def on_train_start(self, trainer, pl_module):
        self._wall_start = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module):
        self._epoch_seconds, self._epoch_tokens = 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._epoch_seconds += time.perf_counter() - self._batch_start
        self.train_batches += 1
        # the mask of a stream batch, the lengths of a sentence batch: summed on the batch's device, read once an
        # epoch (int() here would wait for a GPU every step)
        self._epoch_tokens += batch[2].sum()

    def on_train_epoch_end(self, trainer, pl_module):
        # tokens per second of the run: the processes of a DDP run train their streams side by side
        tokens = torch.as_tensor(self._epoch_tokens, device=pl_module.device)
        self.train_tokens += int(trainer.strategy.reduce(tokens, reduce_op="sum"))
        self.train_seconds.append(self._epoch_seconds)

    def on_validation_end(self, trainer, pl_module):
        value = trainer.callback_metrics.get(self.monitor)
        if not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING and value is not None:
            self.curve.append((trainer.current_epoch + 1, self.wall_seconds(), float(value)))

    def on_test_epoch_start(self, trainer, pl_module):
        self._test_start = time.perf_counter()

    def on_test_end(self, trainer, pl_module):
        # not on_test_epoch_end: callbacks' epoch-end hooks run before the module's, which joins the streams
        self.test_seconds = time.perf_counter() - self._test_start


class EpochLines(pl.Callback):
    """One line per epoch where no progress bar shows: the validation metric, the learning rate, the clock."""

    def __init__(self, speed: SpeedMonitor, label: str):
        self.speed, self.label = speed, label

    def on_validation_end(self, trainer, pl_module):
        if (trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or not self.speed.curve
                or not trainer.is_global_zero):
            return
        epoch, seconds, value = self.speed.curve[-1]
        rate = next((f", lr {group['lr']:.4g}" for optimizer in trainer.optimizers
                     for group in optimizer.param_groups), "")  # the n-gram model has no optimizer
        print(f"{self.label} epoch {epoch}: {self.speed.monitor} {value:.2f}{rate}, {seconds / 60:.1f} min",
              flush=True)


class RandomStates(pl.Callback):
    """The random generators' states in every checkpoint, so that a resumed run draws what an uninterrupted
    one would (dropout, shuffled batches); Lightning restores the weights, optimizer and loops, not these."""

    def state_dict(self) -> dict:
        # numpy's key as a tensor: checkpoints are loaded with torch.load(weights_only=True), which refuses arrays
        name, key, position, has_gauss, gauss = np.random.get_state()
        return {"torch": torch.get_rng_state(), "numpy": (name, torch.from_numpy(key.astype(np.int64)), position,
                                                          has_gauss, gauss), "python": random.getstate()}

    def load_state_dict(self, state_dict: dict) -> None:
        name, key, position, has_gauss, gauss = state_dict["numpy"]
        torch.set_rng_state(state_dict["torch"])
        np.random.set_state((name, key.numpy().astype(np.uint32), position, has_gauss, gauss))
        random.setstate(state_dict["python"])
