"""Feed-forward neural network language model (Bengio, Ducharme, Vincent & Jauvin 2003, "A Neural
Probabilistic Language Model", JMLR 3).

The n-1 previous words w_{t-n+1..t-1} are looked up in a shared embedding table C and concatenated:

    x_t = [C(w_{t-1}); C(w_{t-2}); ... ; C(w_{t-n+1})]
    h_t = tanh(d + H x_t)
    p(w_t | w_{t-n+1..t-1}) = output(h_t)                 (softmax(b + U h_t) with the full output layer)

(Bengio's optional direct connections W x_t are left out, as in Mikolov et al. 2011's feed-forward
baseline.) The "state" carried between chunks is the last n-2 words of each stream, so the context
window slides across chunk boundaries exactly as over the whole text.
"""

from __future__ import annotations

import torch
from torch import nn

from bench.data import Vocabulary
from bench.models.base import LanguageModel

ACTIVATIONS = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": torch.relu}


class FeedForwardLM(LanguageModel):
    def __init__(self, vocab: Vocabulary, order: int = 5, embedding_size: int = 60, hidden_size: int = 200,
                 activation: str = "tanh", **options):
        super().__init__(vocab, hidden_size, **options)
        self.context = order - 1
        self.embedding = nn.Embedding(len(vocab), embedding_size, sparse=self.sparse_embeddings)
        self.hidden = nn.Linear(self.context * embedding_size, hidden_size)
        self.activation = ACTIVATIONS[activation]

    def init_state(self, batch_size: int) -> torch.Tensor:
        # Before the start of a stream: sentence ends, like the <eos> that leads every stream.
        return torch.full((batch_size, self.context - 1), self.eos, dtype=torch.long, device=self.device)

    def hidden_flops_per_token(self) -> float:
        return 2.0 * self.hidden.in_features * self.hidden.out_features

    def forward(self, inputs: torch.Tensor, state: torch.Tensor):
        window = torch.cat([state, inputs], dim=1)  # (B, n-2+T)
        contexts = window.unfold(1, self.context, 1).flip(-1)  # (B, T, n-1), most recent word first
        x = self.embedding(contexts).flatten(2)  # (B, T, (n-1) * embedding)
        next_state = window[:, window.shape[1] - (self.context - 1):]
        return self.activation(self.hidden(x)), next_state
