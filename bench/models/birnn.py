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
or the metrics. The loss and the scores come from bench.models.base.Tagger.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from bench.errors import BenchError
from bench.models.base import Tagger


class BiRNNTagger(Tagger):
    def __init__(self, vocab_size: int, tags: list[str], cell: str = "lstm", embedding_size: int = 100,
                 hidden_size: int = 100, layers: int = 2, activation: str = "tanh", dropout: float = 0.0,
                 bidirectional: bool = True, optimizer: str = "adam", lr: float = 1e-3, l2: float = 0.0,
                 schedule: str = "plateau", decay: float = 1.0, decay_after: int = 0):
        super().__init__(vocab_size, tags, optimizer=optimizer, lr=lr, l2=l2, schedule=schedule, decay=decay,
                         decay_after=decay_after)
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

    def forward(self, words: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Tag logits (B, T, tags) of padded sentences words (B, T) of the given lengths (B,)."""
        packed = pack_padded_sequence(self.drop(self.embedding(words)), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        states, _ = self.rnn(packed)
        states, _ = pad_packed_sequence(states, batch_first=True, total_length=words.shape[1])
        return self.decoder(self.drop(states))
