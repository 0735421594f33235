"""What every language model of the registry shares: the carried state, the loss, the perplexity.

A model reads batches of B parallel streams, `bptt` steps at a time (see bench.data), and keeps the state
it carries across consecutive chunks -- hidden vectors for recurrent models, the last words for the
feed-forward and n-gram models -- detached at every chunk boundary (truncated BPTT; Lightning 2 has no
built-in truncated BPTT). Subclasses define

    init_state(batch_size)          the state at the start of a stream
    forward(inputs, state)          -> hidden (B, T, H), next state

and the output layer (bench.models.output_layers) turns hidden vectors into -log p(target). Perplexity is
exp of the mean per-token cross-entropy over every token, <eos> included, summed in float64.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch

from bench.data import Vocabulary
from bench.errors import BenchError
from bench.models.output_layers import build_output_layer

STAGES = ("train", "val", "test")


def detach(state):
    """The state with its autograd history cut (tensors, or tuples of tensors such as an LSTM's (h, c))."""
    if isinstance(state, tuple):
        return tuple(detach(s) for s in state)
    return state.detach()


class ScoredModel(pl.LightningModule):
    """What every model of the registry shares with Lightning: a scoring pass per stage, opened by
    `_start(stage)` and closed by `_end(stage)`, and its optimizer (hyper-parameters `optimizer`, `lr`)."""

    MONITOR, MODE = "val_ppl", "min"  # the validation metric that early stopping, checkpoints and sweeps watch

    def _start(self, stage: str) -> None:
        raise NotImplementedError

    def _end(self, stage: str) -> None:
        raise NotImplementedError

    def on_validation_epoch_start(self):
        self._start("val")

    def on_validation_epoch_end(self):
        self._end("val")

    def on_test_epoch_start(self):
        self._start("test")

    def on_test_epoch_end(self):
        self._end("test")

    def configure_optimizers(self):
        return configure_optimizer(self, self.hparams.optimizer, self.hparams.lr, self.MONITOR, self.MODE)


class LanguageModel(ScoredModel):
    """Training and evaluation loop of every left-to-right language model."""

    def __init__(self, vocab: Vocabulary, output_size: int | None, *, output: str = "full", optimizer: str = "sgd",
                 lr: float = 0.1, **output_options):
        super().__init__()
        self.save_hyperparameters(ignore=["vocab"])
        self.eos = vocab.eos
        # output_size None: the model computes its probabilities itself (the n-gram model)
        self.output = output_size and build_output_layer(output, output_size, vocab.counts, **output_options)
        self.keep_token_nll = False  # set by the harness when per-token scores are needed (NN+KN)
        self.token_nll: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._state = dict.fromkeys(STAGES)
        self._sums = {stage: [0.0, 0] for stage in STAGES}
        # Exact (float64) perplexity of every scoring pass, per stage; self.log rounds to float32.
        self.perplexities: dict[str, list[float]] = {stage: [] for stage in STAGES}

    def init_state(self, batch_size: int):
        raise NotImplementedError

    def nll(self, inputs: torch.Tensor, targets: torch.Tensor, state):
        """-log p(target) for every position (B, T), and the state after the chunk."""
        hidden, state = self(inputs, state)
        nll = self.output(hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1))
        return nll.view_as(targets), state

    def _step(self, stage: str, batch) -> torch.Tensor:
        inputs, targets, mask = batch
        state = self._state[stage]
        state = self.init_state(inputs.shape[0]) if state is None else detach(state)
        nll, self._state[stage] = self.nll(inputs, targets, state)
        sums = self._sums[stage]
        sums[0] += nll.detach()[mask].double().sum().item()
        sums[1] += int(mask.sum())
        if self.keep_token_nll and stage != "train":
            self.token_nll[stage].append((nll.detach().double(), mask))
        return nll[mask].mean()

    def _start(self, stage: str) -> None:
        self._state[stage] = None
        self._sums[stage] = [0.0, 0]
        self.token_nll[stage] = []

    def _end(self, stage: str) -> None:
        total, count = self._sums[stage]
        if count:
            perplexity = float(np.exp(total / count))
            self.perplexities[stage].append(perplexity)
            self.log(f"{stage}_ppl", perplexity, prog_bar=stage != "test")

    def training_step(self, batch, batch_idx):
        loss = self._step("train", batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at batch {batch_idx}")
        return loss

    def validation_step(self, batch, batch_idx):
        self._step("val", batch)

    def test_step(self, batch, batch_idx):
        self._step("test", batch)

    def on_train_epoch_start(self):
        self._start("train")

    def on_train_epoch_end(self):
        self._end("train")

    def scored_token_nll(self, stage: str) -> np.ndarray:
        """-log p of every token of the last scored split ("val" or "test") in corpus order; needs
        keep_token_nll while scoring. Chunks are columns of the B streams: join them, then read stream by
        stream (see bench.data)."""
        nll = torch.cat([n for n, _ in self.token_nll[stage]], dim=1).reshape(-1)
        mask = torch.cat([m for _, m in self.token_nll[stage]], dim=1).reshape(-1)
        return nll[mask].cpu().numpy()

    def results(self, epochs: int) -> dict:
        """The record's figures: perplexities (valid: the best epoch, whose weights were tested) and the
        validation perplexity of each of the `epochs` training epochs."""
        return {"train_ppl": self.perplexities["train"][-1] if self.perplexities["train"] else None,
                "valid_ppl": min(self.perplexities["val"]), "test_ppl": self.perplexities["test"][-1],
                "valid_ppl_per_epoch": self.perplexities["val"][:epochs]}


def configure_optimizer(module: pl.LightningModule, name: str, lr: float, monitor: str, mode: str) -> dict:
    """SGD or Adam, with Mikolov's schedule: halve the rate when the validation metric stops improving
    (ReduceLROnPlateau, factor 0.5, no patience); the harness's EarlyStopping stops training when it
    stops improving again."""
    if name == "sgd":
        optimizer = torch.optim.SGD(module.parameters(), lr=lr)
    elif name == "adam":
        optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    else:
        raise BenchError(f"unknown optimizer {name!r}: choose sgd or adam")
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=0.5, patience=0,
                                                           threshold=0.003)
    # strict=False: an epoch cut short by max_time has no validation metric to step on
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": monitor, "strict": False}}
