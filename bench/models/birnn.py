"""Deep bidirectional recurrent tagger (Irsoy & Cardie 2014, "Opinion Mining with Deep Recurrent Neural
Networks", EMNLP).

Each of the L layers reads the whole sentence in both directions; the first reads the word embeddings x_t,
every later one the two state sequences of the layer below:

    h->_t(i) = f(W->(i) h->_{t-1}(i) + V->(i) [h->_t(i-1); h<-_t(i-1)] + b->(i))      h(0) = x_t
    h<-_t(i) = f(W<-(i) h<-_{t+1}(i) + V<-(i) [h->_t(i-1); h<-_t(i-1)] + b<-(i))
    y_t      = softmax(U [h->_t(L); h<-_t(L)] + c)                                   over the BIO tags

f is tanh or relu with the Elman cell (the paper's); `cell` gru or lstm puts those recurrences in its
place. `bidirectional=False` keeps only h->: a left-to-right tagger, for comparison. Dropout applies to the
embeddings, between layers and before the output.

Sentences come padded (bench.tagging); the model packs them, so padding never enters a state, the loss
or the metrics. Scores: span-level precision, recall and F1 of the chunks as conlleval counts them
(seqeval, micro-averaged over chunk types), and token accuracy.
"""

from __future__ import annotations

import torch
from seqeval.metrics import f1_score, precision_score, recall_score
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from bench.errors import BenchError
from bench.models.base import ScoredModel

STAGES = ("train", "val", "test")


def span_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """Chunk precision, recall, F1 (conlleval's spans, micro-averaged; seqeval) and token accuracy."""
    pairs = [(g, p) for gs, ps in zip(gold, predicted) for g, p in zip(gs, ps)]
    return {"precision": float(precision_score(gold, predicted)), "recall": float(recall_score(gold, predicted)),
            "f1": float(f1_score(gold, predicted)), "accuracy": sum(g == p for g, p in pairs) / len(pairs)}


class BiRNNTagger(ScoredModel):
    MONITOR, MODE = "val_f1", "max"  # the validation metric that early stopping, checkpoints and sweeps watch

    def __init__(self, vocab_size: int, tags: list[str], cell: str = "lstm", embedding_size: int = 100,
                 hidden_size: int = 100, layers: int = 2, activation: str = "tanh", dropout: float = 0.0,
                 bidirectional: bool = True, optimizer: str = "adam", lr: float = 1e-3, l2: float = 0.0,
                 schedule: str = "plateau", decay: float = 1.0, decay_after: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.tags = list(tags)
        self.embedding = nn.Embedding(vocab_size, embedding_size, padding_idx=0)
        recurrent = dict(num_layers=layers, batch_first=True, bidirectional=bidirectional,
                         dropout=dropout if layers > 1 else 0.0)
        if cell == "elman":
            if activation not in ("tanh", "relu"):
                raise BenchError(f"activation must be tanh or relu for the Elman cell, got {activation!r}")
            self.rnn = nn.RNN(embedding_size, hidden_size, nonlinearity=activation, **recurrent)
        elif cell in ("gru", "lstm"):
            self.rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[cell](embedding_size, hidden_size, **recurrent)
        else:
            raise BenchError(f"unknown cell {cell!r}: choose elman, gru or lstm")
        self.drop = nn.Dropout(dropout)
        self.decoder = nn.Linear(hidden_size * (2 if bidirectional else 1), len(self.tags))
        self._sequences: dict[str, tuple[list, list]] = {}
        self._train_loss = [0.0, 0]
        # Every scoring pass, per stage: precision, recall, f1, accuracy
        self.scores: dict[str, list[dict]] = {stage: [] for stage in STAGES}

    def forward(self, words: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Tag logits (B, T, tags) of padded sentences words (B, T) of the given lengths (B,)."""
        packed = pack_padded_sequence(self.drop(self.embedding(words)), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        states, _ = self.rnn(packed)
        states, _ = pad_packed_sequence(states, batch_first=True, total_length=words.shape[1])
        return self.decoder(self.drop(states))

    def token_nll(self, words: torch.Tensor, tags: torch.Tensor, lengths: torch.Tensor):
        """-log p(tag) of every token (B, T), 0 at padding, the padding mask, and the logits."""
        logits = self(words, lengths)
        mask = torch.arange(words.shape[1], device=words.device) < lengths.unsqueeze(1)
        nll = F.cross_entropy(logits.transpose(1, 2), tags, reduction="none").masked_fill(~mask, 0.0)
        return nll, mask, logits

    def training_step(self, batch, batch_idx):
        nll, mask, _ = self.token_nll(*batch)
        loss = nll.sum() / mask.sum()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at batch {batch_idx}")
        self._train_loss[0] += nll.detach().double().sum().item()
        self._train_loss[1] += int(mask.sum())
        return loss

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
        total, count = self._train_loss
        if count:
            self.log("train_loss", total / count, prog_bar=True)

    def results(self, epochs: int) -> dict:
        """The record's figures: F1 (valid: the best epoch, whose weights were tested), precision, recall,
        token accuracy, and the validation F1 of each of the `epochs` training epochs."""
        test = self.scores["test"][-1]
        return {"valid_f1": max(s["f1"] for s in self.scores["val"]), "test_f1": test["f1"],
                "test_precision": test["precision"], "test_recall": test["recall"],
                "test_accuracy": test["accuracy"], "valid_f1_per_epoch": [s["f1"] for s in self.scores["val"][:epochs]]}
