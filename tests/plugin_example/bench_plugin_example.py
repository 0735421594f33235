"""A tiny language model outside the suite: one GRU layer, h_t = GRU(E x_t, h_{t-1})."""

import torch
from torch import nn

from bench.models.base import LanguageModel


class TinyGRU(LanguageModel):
    STATE_BATCH_DIM = 1  # nn.GRU's state is (layers, streams, width)
    DEFAULTS = dict(optimizer="adam", lr=3e-3, batch_size=16, bptt=20, max_epochs=10)  # training settings
    QUICK = dict(width=32, max_epochs=2)  # `bench run`'s quick suite

    def __init__(self, vocab, width: int = 64, dropout: float = 0.0, **options):
        super().__init__(vocab, width, **options)  # the output layer reads `width`-wide hidden vectors
        self.embedding = nn.Embedding(len(vocab), width)
        self.rnn = nn.GRU(width, width, batch_first=True)
        self.drop = nn.Dropout(dropout)

    def init_state(self, batch_size):
        return torch.zeros(1, batch_size, self.rnn.hidden_size, device=self.device)

    def forward(self, inputs, state):
        hidden, state = self.rnn(self.drop(self.embedding(inputs)), state)
        return self.drop(hidden), state
