"""Gated recurrent language models with PyTorch's fused cells.

GRU (Cho et al. 2014):
    z_t = sigmoid(W_z x_t + U_z h_{t-1}),  r_t = sigmoid(W_r x_t + U_r h_{t-1})
    h_t = (1 - z_t) * h_{t-1} + z_t * tanh(W x_t + U (r_t * h_{t-1}))
LSTM (Hochreiter & Schmidhuber 1997; as regularised by Zaremba et al. 2014, dropout between layers):
    i, f, o = sigmoid(W_{i,f,o} x_t + U_{i,f,o} h_{t-1}),  g = tanh(W_g x_t + U_g h_{t-1})
    c_t = f * c_{t-1} + i * g,  h_t = o * tanh(c_t)

embedding -> dropout -> L stacked layers (dropout between them) -> dropout -> output layer;
`tie_weights` shares the input embedding with the full softmax's output matrix (Press & Wolf 2017).
"""

from __future__ import annotations

import torch
from torch import nn

from bench.data import Vocabulary
from bench.errors import BenchError
from bench.models.base import LanguageModel
from bench.models.output_layers import FullSoftmax

CELLS = {"gru": nn.GRU, "lstm": nn.LSTM}


class RecurrentLM(LanguageModel):
    STATE_BATCH_DIM = 1  # torch's RNN states are (layers, batch, hidden)

    def __init__(self, vocab: Vocabulary, cell: str = "lstm", embedding_size: int = 200, hidden_size: int = 200,
                 layers: int = 2, dropout: float = 0.0, tie_weights: bool = False, **options):
        super().__init__(vocab, hidden_size, **options)
        self.embedding = nn.Embedding(len(vocab), embedding_size, sparse=self.sparse_embeddings and not tie_weights)
        self.rnn = CELLS[cell](embedding_size, hidden_size, num_layers=layers, batch_first=True,
                               dropout=dropout if layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        if tie_weights:
            if not isinstance(self.output, FullSoftmax) or embedding_size != hidden_size:
                raise BenchError("tie_weights needs output=full and embedding_size == hidden_size")
            self.output.decoder.weight = self.embedding.weight

    def init_state(self, batch_size: int):
        h = torch.zeros(self.rnn.num_layers, batch_size, self.rnn.hidden_size, device=self.device)
        return (h, torch.zeros_like(h)) if isinstance(self.rnn, nn.LSTM) else h

    def hidden_flops_per_token(self) -> float:
        gates = 4 if isinstance(self.rnn, nn.LSTM) else 3
        width, hidden = self.rnn.input_size, self.rnn.hidden_size
        return sum(2.0 * gates * hidden * ((width if layer == 0 else hidden) + hidden)
                   for layer in range(self.rnn.num_layers))

    def forward(self, inputs: torch.Tensor, state):
        hidden, state = self.rnn(self.drop(self.embedding(inputs)), state)
        return self.drop(hidden), state
