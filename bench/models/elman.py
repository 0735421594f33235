"""Elman recurrent network language model (Elman 1990; Mikolov et al. 2010, 2011), trained by BP or BPTT.

    h_t = f(U x_t + W h_{t-1} + b)        x_t the 1-of-N code of word w_t, so U x_t is a row lookup
    p(w_{t+1} | w_{1..t}) = output(h_t)   (softmax(V h_t + c) with the full output layer)

f is the sigmoid in Mikolov's RNNLM (tanh and relu are options).

Training (Mikolov et al. 2011, Table 2: "RNN trained by BP" vs "by BPTT"):
  bp:   the error is propagated one step only -- h_{t-1} is a constant for the gradient. Still exact and
        batched: run the recurrence once without gradient to get every h_{t-1}, then recompute all steps
        from their detached predecessors in one call.
  bptt: truncated backpropagation through time over the `bptt` steps of each chunk.
"""

from __future__ import annotations

import torch
from torch import nn

from bench.data import Vocabulary
from bench.models.base import LanguageModel
from bench.models.ffnn import ACTIVATIONS


class ElmanLM(LanguageModel):
    def __init__(self, vocab: Vocabulary, backprop: str = "bptt", hidden_size: int = 200,
                 activation: str = "sigmoid", **options):
        super().__init__(vocab, hidden_size, **options)
        self.backprop = backprop
        self.input = nn.Embedding(len(vocab), hidden_size)  # U, one column per word
        self.recurrent = nn.Linear(hidden_size, hidden_size)  # W and b
        self.activation = ACTIVATIONS[activation]

    def init_state(self, batch_size: int) -> torch.Tensor:
        return torch.zeros(batch_size, self.recurrent.in_features, device=self.device)

    def forward(self, inputs: torch.Tensor, state: torch.Tensor):
        return self.recur(self.input(inputs), state)

    def recur(self, ux: torch.Tensor, state: torch.Tensor):
        """Hidden states (B, T, H) from the input projections U x_t (B, T, H) and h_0 = state."""
        if self.backprop == "bp":
            with torch.no_grad():
                states, _ = self._unroll(ux, state)
            previous = torch.cat([state.unsqueeze(1), states[:, :-1]], dim=1)
            hidden = self.activation(ux + self.recurrent(previous))
            return hidden, states[:, -1]
        return self._unroll(ux, state)

    def _unroll(self, ux: torch.Tensor, h: torch.Tensor):
        states = []
        for t in range(ux.shape[1]):
            h = self.activation(ux[:, t] + self.recurrent(h))
            states.append(h)
        return torch.stack(states, dim=1), h
