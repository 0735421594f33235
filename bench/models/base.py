"""The interface of every model the suite trains, built-in or plugin (bench.models.plugins), and what the
suite does for it.

A language model subclasses LanguageModel. Its __init__(vocab, <hyper-parameters with typed defaults>,
**options) calls LanguageModel.__init__(vocab, H, **options) with H the width of its hidden vectors, and it
implements

    init_state(batch_size)       the state at the start of a stream: a tensor, or a tuple of tensors, with the
                                 streams along dimension STATE_BATCH_DIM (0 unless the class says otherwise)
    forward(inputs, state)       inputs (B, T) word ids -> hidden (B, T, H), the state after the chunk
    hidden_flops_per_token()     optional: FLOPs of one token up to the hidden vector (records GFLOP/s)

The suite guarantees it: batches of B parallel streams of the corpus, T = `bptt` steps at a time, in
order, each stream continuing where its previous chunk ended (bench.data); the state it returned for the
previous chunk, detached (the gradient stops at the chunk boundary -- truncated BPTT; Lightning 2 has no
built-in truncated BPTT); and everything after the hidden vectors: the output layer (`output` full, class
or adaptive; bench.models.output_layers) turning them into -log p(target), the loss (per-token mean),
the optimizer (`optimizer`, `lr`, `l2`), gradient clipping, the schedule, checkpoints and resume, the
exact perplexity, NN+KN interpolation and the record. Perplexity is exp of the mean per-token
cross-entropy over every token, <eos> included, summed in float64.

Scoring in B parallel streams is exact: it gives the scores of one stream read from the start (to float
rounding), B times fewer sequential steps later. Stream b > 0 starts mid-text from an empty state, so its
first chunks are scored again from the state stream b-1 ended in, chunk after chunk, until the state
agrees with the parallel run's (models forget their start: an n-gram after n-1 words, a trained recurrent
network within tens of words); from there on the parallel scores are the one-stream scores. A model whose
state never agrees is scored whole, one stream after the other: exact, only slower.

    stream 0   |=================|                 exact from the start
    stream 1                     |xx===============|  xx: re-scored from stream 0's last state
    stream 2                                       |x=================|

A tagger subclasses Tagger: __init__(vocab_size, tags, <hyper-parameters>, **options) calls
Tagger.__init__(vocab_size, tags, **options) and forward(words (B, T), lengths (B,)) returns tag logits
(B, T, len(tags)) of padded sentences; the suite does the loss, padding excluded, and the chunk F1.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import torch
from seqeval.metrics import f1_score, precision_score, recall_score
from torch.nn import functional as F
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from bench.data import Vocabulary
from bench.errors import BenchError
from bench.models.output_layers import ClassSoftmax, build_output_layer, plan_to
from bench.schedules import lr_scheduler
from bench.tasks import LANGUAGE_MODEL, TAGGER

STAGES = ("train", "val", "test")
LOG_FLOAT_MAX = math.log(np.finfo(np.float64).max)
STATE_TOLERANCE = 1e-5  # states this close (max abs difference) count as the same when joining streams


def detach(state):
    """The state with its autograd history cut (tensors, or tuples of tensors such as an LSTM's (h, c))."""
    if isinstance(state, tuple):
        return tuple(detach(s) for s in state)
    return state.detach()


def stream_state(state, stream: int, dim: int):
    """Stream `stream`'s part of a batched state, keeping the batch dimension `dim` (of length 1)."""
    if isinstance(state, tuple):
        return tuple(stream_state(s, stream, dim) for s in state)
    return state.narrow(dim, stream, 1)


def same_state(a, b) -> bool:
    if isinstance(a, tuple):
        return all(same_state(x, y) for x, y in zip(a, b))
    return bool((a.double() - b.double()).abs().max() <= STATE_TOLERANCE) if a.numel() else True


class ScoredModel(pl.LightningModule):
    """What every model of the registry shares with Lightning: a scoring pass per stage, opened by
    `_start(stage)` and closed by `_end(stage)`, and its optimizer and schedule (hyper-parameters
    `optimizer`, `lr`, `l2`, `schedule`, `decay`, `decay_after`; bench.schedules)."""

    MONITOR, MODE = LANGUAGE_MODEL.monitor, LANGUAGE_MODEL.mode  # what early stopping, checkpoints, sweeps watch

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
        hparams = self.hparams
        optimizer = make_optimizer(self, hparams.optimizer, hparams.lr, hparams.get("l2", 0.0))
        scheduler = lr_scheduler(optimizer, hparams.get("schedule", "plateau"), hparams.get("decay", 1.0),
                                 hparams.get("decay_after", 0), self.MONITOR, self.MODE)
        return {"optimizer": optimizer, "lr_scheduler": scheduler} if scheduler else optimizer

    def init_uniform(self, init_range: float) -> None:
        """Every parameter drawn from U(-init_range, init_range) (Zaremba et al. 2014 use 0.1)."""
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.uniform_(-init_range, init_range)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Scale the gradients down to a total norm of `clip` when they exceed it (the Trainer's
        gradient_clip_val): torch.nn.utils.clip_grad_norm_, whose norm refuses the sparse gradients of the
        embeddings and the class layer's word rows, so the norm is taken here. A sparse gradient's norm is that
        of its coalesced rows, the dense gradient's norm: clipping is the same either way. On a GPU the scale
        stays on the device (1 below the limit), so clipping asks the host nothing; on the CPU the norm is on
        the host already, and below the limit the scaling, which reads and writes every gradient, is skipped
        (PTB, 100 classes, one thread, load 3.5 on 2 cores: the scaling took 0.28 ms a step at 16 streams,
        0.75 and 0.88 at 32 and 128, where the word rows' gradient is dense, 10k x 200)."""
        if not gradient_clip_val:
            return
        parameters = [p for p in self.parameters() if p.grad is not None]
        if not parameters:
            return
        total = get_total_norm([p.grad.coalesce().values() if p.grad.is_sparse else p.grad for p in parameters])
        if total.device.type != "cpu" or total > gradient_clip_val:
            clip_grads_with_norm_(parameters, gradient_clip_val, total)


class LanguageModel(ScoredModel):
    """Training and evaluation loop of every left-to-right language model (the interface: module docstring)."""

    STATE_BATCH_DIM = 0  # the dimension of the state that holds the streams

    def __init__(self, vocab: Vocabulary, output_size: int | None, *, output: str = "full", optimizer: str = "sgd",
                 lr: float = 0.1, l2: float = 0.0, schedule: str = "plateau", decay: float = 1.0,
                 decay_after: int = 0, **output_options):
        super().__init__()
        self.save_hyperparameters(ignore=["vocab"])
        self.eos = vocab.eos
        # Under SGD the input embeddings' gradients are sparse, a row per word of the batch: a dense |V| x E
        # gradient costs zeroing, clipping and updating every row every step (PTB, 640 tokens a step: the
        # embedding's backward alone was 0.6 of 10 ms). torch's Adam takes dense gradients only.
        self.sparse_embeddings = optimizer == "sgd"
        # output_size None: the model computes its probabilities itself (the n-gram model)
        self.output = output_size and build_output_layer(output, output_size, vocab.counts, **output_options)
        # The class layer's word rows likewise, under SGD without L2: there the rows a step does not touch
        # do not move, so the sparse step is the dense one. L2 decays every row every step, and Adam moves
        # every row with its moments: both keep the dense gradient, and their mathematics (make_optimizer).
        if isinstance(self.output, ClassSoftmax):
            self.output.sparse_rows = optimizer == "sgd" and not l2
        # per scoring stage, every chunk as (inputs, targets, mask, -log p, state after it)
        self._scored: dict[str, list[tuple]] = {}
        self._state = dict.fromkeys(STAGES)
        # per stage, the summed -log p and the token count of the pass; the training pass's stay on the device
        self._sums = {stage: [0.0, 0] for stage in STAGES}
        # Exact (float64) perplexity of every scoring pass, per stage; self.log rounds to float32.
        self.perplexities: dict[str, list[float]] = {stage: [] for stage in STAGES}

    def init_state(self, batch_size: int):
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        """A run on several processes (DDP) keeps every gradient dense: DDP's reducer takes the class layer's
        sparse word rows for dense ones and fails (CPU, gloo: "Cannot access storage of SparseTensorImpl");
        the embeddings' sparse gradients did all-reduce over gloo, but have never been tried over NCCL. Runs
        before configure_optimizers, which groups the parameters by it (make_optimizer)."""
        if self.trainer.world_size > 1:
            for module in self.modules():
                if isinstance(module, torch.nn.Embedding):
                    module.sparse = False
            if isinstance(self.output, ClassSoftmax):
                self.output.sparse_rows = False

    def hidden_flops_per_token(self) -> float | None:
        """FLOPs (2 per multiply-add) of one token's forward pass up to the hidden vector; None: not known."""
        return None

    def training_flops_per_token(self) -> float | None:
        """FLOPs of one training token: forward through the output layer, and a backward pass of about twice
        the forward's (a gradient for the inputs and one for the weights of every product)."""
        hidden = self.hidden_flops_per_token()
        output = getattr(self.output, "flops_per_token", None)
        return None if hidden is None or output is None else 3 * (hidden + output())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["perplexities"] = self.perplexities  # a resumed run's record holds every epoch's figures

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.perplexities = checkpoint.get("perplexities", self.perplexities)

    def nll(self, inputs: torch.Tensor, targets: torch.Tensor, state, plan=None):
        """-log p(target) for every position (B, T), and the state after the chunk. `plan`: what the output
        layer worked out from the targets on the host (on_before_batch_transfer), if it needs anything."""
        hidden, state = self(inputs, state)
        hidden, targets_flat = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        nll = self.output(hidden, targets_flat) if plan is None else self.output(hidden, targets_flat, plan)
        return nll.view_as(targets), state

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """A batch (inputs, targets, mask) gets the output layer's plan of its targets, made on the host where
        the targets are, so that the step needs no host copy of them (bench.models.output_layers.ClassPlan)."""
        plan = getattr(self.output, "plan", None)
        return batch if plan is None or len(batch) != 3 else (*batch, plan(batch[1].reshape(-1)))

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        """(inputs, targets, mask[, plan]) on `device`. Lightning's own transfer walks every element of the
        plan, each class's tuple included (PTB, 100 classes, one thread, 16 streams: 0.84 of 6.6 ms a step
        under cProfile, 1.5 of 11.2 at 32)."""
        tensors, plan = batch[:3], batch[3:]
        return (*(t.to(device) for t in tensors), *(plan_to(p, device) for p in plan))

    def _step(self, stage: str, batch) -> torch.Tensor:
        inputs, targets, mask, *plan = batch
        state = self._state[stage]
        state = self.init_state(inputs.shape[0]) if state is None else detach(state)
        nll, self._state[stage] = self.nll(inputs, targets, state, *plan)
        if stage != "train":  # summed once the streams are joined (_end)
            self._scored[stage].append((inputs, targets, mask, nll.detach(), detach(self._state[stage])))
            return None
        # Without a host sync: where, not nll[mask] (a size the host must know), and the sums stay tensors.
        sums, count = self._sums[stage], mask.sum()
        sums[0] = sums[0] + torch.where(mask, nll.detach().double(), 0.0).sum()
        sums[1] = sums[1] + count
        return torch.where(mask, nll, 0.0).sum() / count

    def _join_streams(self, stage: str) -> None:
        """Re-score the start of every stream after the first from the previous stream's last state, until
        the state agrees with the parallel run's (see the module docstring)."""
        chunks, dim = self._scored[stage], self.STATE_BATCH_DIM
        previous_end = stream_state(chunks[-1][4], 0, dim)
        for stream in range(1, chunks[0][0].shape[0]):
            state = previous_end
            for inputs, targets, _, nll, parallel_state in chunks:
                exact, state = self.nll(inputs[stream:stream + 1], targets[stream:stream + 1], state)
                nll[stream] = exact[0]
                if same_state(state, stream_state(parallel_state, stream, dim)):
                    previous_end = stream_state(chunks[-1][4], stream, dim)
                    break
            else:
                previous_end = state

    def _start(self, stage: str) -> None:
        self._state[stage] = None
        self._sums[stage] = [0.0, 0]
        self._scored[stage] = []

    def _end(self, stage: str) -> None:
        if stage != "train" and self._scored[stage]:
            self._join_streams(stage)
            nll, mask = self._scored_stream(stage)
            self._sums[stage] = [float(nll[mask].double().sum()), int(mask.sum())]
        elif stage == "train":  # summed over the processes of a DDP run, each of which trained its own streams
            sums = torch.tensor([float(s) for s in self._sums[stage]], dtype=torch.float64, device=self.device)
            self._sums[stage] = self.trainer.strategy.reduce(sums, reduce_op="sum").tolist()
        total, count = float(self._sums[stage][0]), int(self._sums[stage][1])
        if stage == "train" and not math.isfinite(total):
            raise FloatingPointError(f"training loss became {total / max(count, 1)} in epoch {self.current_epoch}")
        if count:
            # a diverged run's cross-entropy overflows exp: its perplexity is inf, without numpy's warning
            perplexity = math.exp(total / count) if total / count < LOG_FLOAT_MAX else math.inf
            self.perplexities[stage].append(perplexity)
            # sync_dist: the schedules read the figure, and every process of a DDP run must take their decisions
            # alike (validation and test figures are the same in each: every process scores the whole split)
            self.log(f"{stage}_ppl", perplexity, prog_bar=stage != "test", sync_dist=True)

    def training_step(self, batch, batch_idx):
        """The step's mean -log p. A non-finite loss is caught at the end of the epoch, from the summed loss
        (_end), not here: checking every step would make the host wait for the device every step."""
        return self._step("train", batch)

    def validation_step(self, batch, batch_idx):
        self._score("val", batch)

    def test_step(self, batch, batch_idx):
        self._score("test", batch)

    def _score(self, stage: str, batch) -> None:
        """A scoring step in fp32 whatever the Trainer's precision (mixed precision speeds up training): the
        figures stay the exact one-stream ones, and the streams join -- _join_streams runs outside autocast,
        and a state computed in bf16 would neither agree with its own nor feed it (torch's RNNs refuse a
        bf16 state with fp32 weights)."""
        with torch.autocast(self.device.type, enabled=False):
            self._step(stage, batch)

    def on_train_epoch_start(self):
        self._start("train")

    def on_train_epoch_end(self):
        self._end("train")

    def _scored_stream(self, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """-log p and mask of every position of the last scoring pass of `stage`, in corpus order. Chunks are
        columns of the B streams: join them, then read stream by stream (see bench.data)."""
        nll = torch.cat([chunk[3] for chunk in self._scored[stage]], dim=1).reshape(-1)
        mask = torch.cat([chunk[2] for chunk in self._scored[stage]], dim=1).reshape(-1)
        return nll, mask

    def scored_token_nll(self, stage: str) -> np.ndarray:
        """-log p of every token of the last scored split ("val" or "test") in corpus order."""
        nll, mask = self._scored_stream(stage)
        return nll[mask].double().cpu().numpy()

    def results(self, epochs: int) -> dict:
        """The record's figures: perplexities (valid: the best epoch, whose weights were tested) and the
        validation perplexity of each of the `epochs` training epochs."""
        return {"train_ppl": self.perplexities["train"][-1] if self.perplexities["train"] else None,
                "valid_ppl": min(self.perplexities["val"]), "test_ppl": self.perplexities["test"][-1],
                "valid_ppl_per_epoch": self.perplexities["val"][:epochs]}


def span_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """Chunk precision, recall, F1 (conlleval's spans, micro-averaged; seqeval) and token accuracy."""
    pairs = [(g, p) for gs, ps in zip(gold, predicted) for g, p in zip(gs, ps)]
    return {"precision": float(precision_score(gold, predicted)), "recall": float(recall_score(gold, predicted)),
            "f1": float(f1_score(gold, predicted)), "accuracy": sum(g == p for g, p in pairs) / len(pairs)}


class Tagger(ScoredModel):
    """Training and evaluation loop of every sequence tagger (the interface: module docstring): the
    per-token cross-entropy loss, padding excluded, and span-level precision, recall and F1 of the chunks as
    conlleval counts them (seqeval, micro-averaged over chunk types), and token accuracy."""

    MONITOR, MODE = TAGGER.monitor, TAGGER.mode  # what early stopping, checkpoints and sweeps watch

    def __init__(self, vocab_size: int, tags: list[str], *, optimizer: str = "adam", lr: float = 1e-3,
                 l2: float = 0.0, schedule: str = "plateau", decay: float = 1.0, decay_after: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.tags = list(tags)
        self._sequences: dict[str, tuple[list, list]] = {}
        self._train_loss = [0.0, 0]
        # Every scoring pass, per stage: precision, recall, f1, accuracy
        self.scores: dict[str, list[dict]] = {stage: [] for stage in STAGES}

    def token_nll(self, words: torch.Tensor, tags: torch.Tensor, lengths: torch.Tensor):
        """-log p(tag) of every token (B, T), 0 at padding, the padding mask, and the logits."""
        logits = self(words, lengths)
        mask = torch.arange(words.shape[1], device=words.device) < lengths.unsqueeze(1)
        nll = F.cross_entropy(logits.transpose(1, 2), tags, reduction="none").masked_fill(~mask, 0.0)
        return nll, mask, logits

    def training_step(self, batch, batch_idx):
        """The step's mean -log p; the sums stay on the device, and a non-finite loss is caught from them at
        the end of the epoch (as LanguageModel's)."""
        nll, mask, _ = self.token_nll(*batch)
        count = mask.sum()
        self._train_loss[0] = self._train_loss[0] + nll.detach().double().sum()
        self._train_loss[1] = self._train_loss[1] + count
        return nll.sum() / count

    def _score_batch(self, stage: str, batch) -> None:
        words, tags, lengths = batch
        predicted = self(words, lengths).argmax(-1)
        gold_sequences, predicted_sequences = self._sequences[stage]
        for gold, guess, length in zip(tags.tolist(), predicted.tolist(), lengths.tolist()):
            gold_sequences.append([self.tags[t] for t in gold[:length]])
            predicted_sequences.append([self.tags[t] for t in guess[:length]])

    def validation_step(self, batch, batch_idx):
        self._score_batch("val", batch)

    def test_step(self, batch, batch_idx):
        self._score_batch("test", batch)

    def _start(self, stage: str) -> None:
        self._sequences[stage] = ([], [])

    def _end(self, stage: str) -> None:
        gold, predicted = self._sequences[stage]
        if not gold:
            return
        scores = span_scores(gold, predicted)
        self.scores[stage].append(scores)
        self.log(f"{stage}_f1", scores["f1"], prog_bar=stage == "val")

    def on_train_epoch_start(self):
        self._train_loss = [0.0, 0]

    def on_train_epoch_end(self):
        total, count = float(self._train_loss[0]), int(self._train_loss[1])
        if not math.isfinite(total):
            raise FloatingPointError(f"training loss became {total / max(count, 1)} in epoch {self.current_epoch}")
        if count:
            self.log("train_loss", total / count, prog_bar=True)

    def results(self, epochs: int) -> dict:
        """The record's figures: F1 (valid: the best epoch, whose weights were tested), precision, recall,
        token accuracy, and the validation F1 of each of the `epochs` training epochs."""
        test = self.scores["test"][-1]
        return {"valid_f1": max(s["f1"] for s in self.scores["val"]), "test_f1": test["f1"],
                "test_precision": test["precision"], "test_recall": test["recall"],
                "test_accuracy": test["accuracy"], "valid_f1_per_epoch": [s["f1"] for s in self.scores["val"][:epochs]]}


def sparse_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of `module` whose gradients are sparse: the input embeddings under SGD, and the class
    layer's word rows under SGD without L2 (LanguageModel)."""
    return [p for m in module.modules()
            for p in (m.parameters() if isinstance(m, torch.nn.Embedding) and m.sparse
                      else m.sparse_parameters() if isinstance(m, ClassSoftmax) else ())]


def make_optimizer(module: pl.LightningModule, name: str, lr: float, l2: float = 0.0) -> torch.optim.Optimizer:
    """SGD or Adam over the module's parameters, with L2 weight decay `l2` (rnnlm's -beta) on the dense ones:
    torch's SGD takes no weight decay with sparse gradients. So under SGD the input embeddings get no L2, as
    before; the class layer's word rows are sparse only without L2 (LanguageModel), so they always get it.
    A sparse SGD step moves the rows the step touched, and only those: with no L2 and no momentum it is the
    dense step, whose other rows' gradients are zero."""
    sparse = sparse_parameters(module)
    dense = [p for p in module.parameters() if all(p is not q for q in sparse)]
    groups = [{"params": dense, "weight_decay": l2}] + ([{"params": sparse, "weight_decay": 0.0}] if sparse else [])
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    raise BenchError(f"unknown optimizer {name!r}: choose sgd or adam")
