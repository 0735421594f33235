"""Learning-rate schedules of the papers, chosen by the `schedule` hyper-parameter.

    plateau   halve the rate when validation stops improving (ReduceLROnPlateau, 0.3% threshold); stop
              after `patience` more epochs without improvement (EarlyStopping)
    rnnlm     Mikolov's rnnlm toolkit (Mikolov et al. 2011; rnnlm 0.4b, `min_improvement`, `alpha_divide`):
              after each epoch, with L the mean validation cross-entropy (minus the log-likelihood per
              token),
                  L_prev / L < min_improvement   ->  start halving the rate, every epoch from then on;
                                                      the second time: stop
                  L > L_prev                      ->  restore the previous epoch's weights first
    zaremba   Zaremba et al. 2014 ("Recurrent neural network regularization", the small PTB model): the rate
              `lr` for `decay_after` epochs, then multiplied by `decay` every epoch, for max_epochs epochs
              (lr_i = lr * decay ** max(0, i + 1 - decay_after), epoch i counted from 0)

The module's configure_optimizers takes the torch scheduler of its schedule (`lr_scheduler`); the harness
adds the callbacks (`schedule_callbacks`). rnnlm's schedule is a callback, not a torch scheduler, because
it restores weights and stops training as well as setting the rate.

Loss scale. The suite's loss is the mean cross-entropy per token. Zaremba's (and the TensorFlow PTB
tutorial's) is summed over the `bptt` steps and averaged over the batch, so its gradient is `bptt` times
ours: its lr 1 and gradient-norm clip 5 at 20 steps are lr 20 and clip 0.25 here (pytorch/examples'
word_language_model defaults).
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping


def lr_scheduler(optimizer: torch.optim.Optimizer, schedule: str, decay: float, decay_after: int, monitor: str,
                 mode: str) -> dict | None:
    """Lightning's lr_scheduler configuration of `schedule`, or None (rnnlm: RnnlmSchedule sets the rate)."""
    if schedule == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=0.5, patience=0,
                                                               threshold=0.003)
        # strict=False: an epoch cut short by max_time has no validation metric to step on
        return {"scheduler": scheduler, "monitor": monitor, "strict": False}
    if schedule == "zaremba":
        return {"scheduler": torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda epoch: decay ** max(0, epoch + 1 - decay_after)), "interval": "epoch"}
    return None


def schedule_callbacks(config: dict, monitor: str, mode: str) -> list[pl.Callback]:
    """The callbacks that end (and for rnnlm, steer) a run of `config`'s schedule."""
    schedule = config.get("schedule")
    if schedule == "plateau":
        # The first epoch without improvement halves the learning rate (the scheduler); training stops after
        # `patience` more, so the halved rate is always tried.
        return [EarlyStopping(monitor=monitor, mode=mode, patience=config["patience"] + 1, check_finite=True)]
    if schedule == "rnnlm":
        return [RnnlmSchedule(monitor, config["min_improvement"])]
    return []  # zaremba, and models without training: max_epochs ends the run


class RnnlmSchedule(pl.Callback):
    """Mikolov's rnnlm schedule (see the module docstring), after every validation epoch.

    Runs before ModelCheckpoint (Lightning calls checkpoint callbacks last), so a checkpoint holds the
    weights and rate this schedule has just settled on: the weights kept in memory for a restore are the
    ones a resumed run loads, and need not be saved.
    """

    def __init__(self, monitor: str = "val_ppl", min_improvement: float = 1.003):
        self.monitor, self.min_improvement = monitor, min_improvement
        self.previous_loss: float | None = None
        self.halving = self.finished = False
        self._kept: dict | None = None

    def state_dict(self) -> dict:
        return {"previous_loss": self.previous_loss, "halving": self.halving, "finished": self.finished}

    def load_state_dict(self, state_dict: dict) -> None:
        self.previous_loss, self.halving = state_dict["previous_loss"], state_dict["halving"]
        self.finished = state_dict["finished"]

    def on_train_start(self, trainer, pl_module):
        self._kept = _weights(pl_module)
        if self.finished:  # resumed after the schedule had already stopped the run
            trainer.should_stop = True

    def on_validation_end(self, trainer, pl_module):
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None:
            return
        loss = math.log(float(value))  # cross-entropy per token
        previous = self.previous_loss
        if previous is not None and loss > previous:
            pl_module.load_state_dict(self._kept)
        else:
            self._kept = _weights(pl_module)
        if previous is not None and previous < loss * self.min_improvement:
            if self.halving:
                self.finished = trainer.should_stop = True
                return
            self.halving = True
        if self.halving:
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] /= 2
        self.previous_loss = loss


def _weights(module: torch.nn.Module) -> dict:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
