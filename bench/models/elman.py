"""Elman recurrent network language model (Elman 1990; Mikolov et al. 2010, 2011), trained by BP or BPTT.

    h_t = f(U x_t + W h_{t-1} + b)        x_t the 1-of-N code of word w_t, so U x_t is a row lookup
    p(w_{t+1} | w_{1..t}) = output(h_t)   (softmax(V h_t + c) with the full output layer)

f is the sigmoid in Mikolov's RNNLM (tanh and relu are options). `dropout` (not in the paper, 0 by default)
drops units of h_t on their way to the output layer only, never in the recurrence (Zaremba et al. 2014).

Training (Mikolov et al. 2011, Table 2: "RNN trained by BP" vs "by BPTT"):
  bp:   the error is propagated one step only -- h_{t-1} is a constant for the gradient. Still exact and
        batched: run the recurrence once without gradient to get every h_{t-1}, then recompute all steps
        from their detached predecessors in one call.
  bptt: truncated backpropagation through time over the `bptt` steps of each chunk, and, with
        `bptt_context` K > 0, through the K steps before the chunk too. Those steps are run again, their
        words not scored a second time, so that every word's error reaches K + 1 to K + bptt steps back --
        as in the rnnlm toolkit, whose -bptt 5 sends each error 6 to 15 steps back -- and not 1 to bptt:

            chunk n-1   ... w w w w w |                    state carried: h before the last K words
            chunk n           |w w w w w w w w w w|        gradient through K + bptt steps,
                               ^^^^^^^^^ K context          the loss of the bptt scored ones only

Scoring runs the same recurrence through torch's C++ RNN loop (torch.rnn_tanh / rnn_relu), which takes
sigmoid cells too through the identity sigmoid(a) = (1 + tanh(a / 2)) / 2: with g = 2h - 1,

    g_t = tanh(U x_t / 2 + (b / 2 + W 1 / 4) + (W / 4) g_{t-1}),   h_t = (g_t + 1) / 2.

One stream of 4,096 steps (hidden 200): 7 us a step instead of 14 for the Python loop. Training keeps the
loop, which is faster over a few steps (bptt 5, 32 streams: 0.14 against 0.30 ms).
"""

from __future__ import annotations

import torch
from torch import nn

from bench.data import Vocabulary
from bench.models.base import LanguageModel
from bench.models.ffnn import ACTIVATIONS


class ElmanLM(LanguageModel):
    def __init__(self, vocab: Vocabulary, backprop: str = "bptt", hidden_size: int = 200,
                 activation: str = "sigmoid", dropout: float = 0.0, bptt_context: int = 0, **options):
        super().__init__(vocab, hidden_size, **options)
        self.drop = nn.Dropout(dropout)  # on the way to the output layer only, as Zaremba et al. 2014; 0 in the paper
        self.backprop = backprop
        self.context = bptt_context if backprop == "bptt" else 0
        self.input = nn.Embedding(len(vocab), hidden_size, sparse=self.sparse_embeddings)  # U, one column per word
        self.recurrent = nn.Linear(hidden_size, hidden_size)  # W and b
        self.activation_name = activation
        self.activation = ACTIVATIONS[activation]

    def init_state(self, batch_size: int):
        h = self.recurrent.weight.new_zeros(batch_size, self.recurrent.in_features)
        if self.training and self.context:  # h_t, h before the context words, the context words
            return h, h, torch.zeros(batch_size, 0, dtype=torch.long, device=self.device)
        return h

    def hidden_flops_per_token(self) -> float:
        return 2.0 * self.recurrent.in_features * self.recurrent.out_features  # W h_{t-1}; U x_t is a lookup

    def forward(self, inputs: torch.Tensor, state):
        if isinstance(state, tuple):
            return self._forward_with_context(inputs, *state)
        hidden, state = self.recur(self.input(inputs), state)
        return self.drop(hidden), state

    def _forward_with_context(self, inputs: torch.Tensor, _, context_start: torch.Tensor, context: torch.Tensor):
        """Training with `bptt_context`: run the context words again from the state before them (the
        gradient flows through them), then the chunk; carry the state before the chunk's last K words."""
        words = torch.cat([context, inputs], dim=1)
        states, last = self._unroll(self.input(words), context_start)
        kept = min(self.context, words.shape[1])
        next_start = states[:, -kept - 1] if kept < words.shape[1] else context_start
        return self.drop(states[:, context.shape[1]:]), (last, next_start, words[:, -kept:])

    def recur(self, ux: torch.Tensor, state: torch.Tensor):
        """Hidden states (B, T, H) from the input projections U x_t (B, T, H) and h_0 = state."""
        if not self.training:
            return self._fused_unroll(ux, state)
        if self.backprop == "bp":
            with torch.no_grad():
                states, _ = self._unroll(ux, state)
            previous = torch.cat([state.unsqueeze(1), states[:, :-1]], dim=1)
            hidden = self.activation(ux + self.recurrent(previous))
            return hidden, states[:, -1]
        return self._unroll(ux, state)

    def _unroll(self, ux: torch.Tensor, h: torch.Tensor):
        states = []
        # unbind, not ux[:, t]: each slice's backward fills a zero (B, T, H) gradient, unbind's is one stack
        # (PTB, class layer C = 100, 128 streams, 1 thread: a training step 14.0 -> 13.2 ms, median of 6)
        for x in ux.unbind(1):
            h = self.activation(x + self.recurrent(h))
            states.append(h)
        return torch.stack(states, dim=1), h

    def _fused_unroll(self, ux: torch.Tensor, h: torch.Tensor):
        """_unroll through torch's C++ RNN loop (see the module docstring for the sigmoid identity)."""
        weight, bias = self.recurrent.weight, self.recurrent.bias
        identity = torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device)  # U x_t is the input
        if self.activation_name == "sigmoid":
            ux, bias, weight, h = ux / 2, bias / 2 + weight.sum(1) / 4, weight / 4, 2 * h - 1
        run = torch.rnn_relu if self.activation_name == "relu" else torch.rnn_tanh
        # keywords as torch's own signature names them; tests/test_models.py pins the result to _unroll's
        states, last = run(ux + bias, h.unsqueeze(0).contiguous(), [identity, weight], has_biases=False,
                           num_layers=1, dropout=0.0, train=False, bidirectional=False, batch_first=True)
        if self.activation_name == "sigmoid":
            states, last = (states + 1) / 2, (last + 1) / 2
        return states, last[0]
