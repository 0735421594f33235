"""A small causal Transformer language model (Vaswani et al. 2017, "Attention is all you need"), pre-norm
(Xiong et al. 2020), reading the suite's streams chunk by chunk like the recurrent models.

Each of the L blocks maps the sequence x (width H) to

    a = x + Dropout(W_o MultiHead(LN(x)))                        pre-norm: the residual stream is never normed
    y = a + Dropout(W_2 relu(W_1 LN(a) + b_1) + b_2)             feed-forward of width F

    MultiHead: per head h (H/heads wide), query i attends to the keys j of the window i - C <= j <= i:
        q_i = W_q^h LN(x_i),  k_j = W_k^h LN(x_j),  v_j = W_v^h LN(x_j)
        s_ij = q_i . k_j / sqrt(H/heads) + r^h[i - j]            r: a learned bias per head and distance 0..C
        out_i = sum_j softmax_j(s_ij) v_j                        j > i (the future) and j < i - C masked out

and the output layer reads LN(x) after the last block. Positions enter only through the relative bias r
(Shaw et al. 2018; T5's, without buckets): a word's scores depend on the words before it, not on where a
chunk happens to start.

The carried state is the last C = `context` positions of every block's input (the memory of Transformer-XL,
Dai et al. 2019), so a chunk's first word attends to the C words before it, in the previous chunk, like every
other word; the gradient stops at the chunk boundary (the suite detaches the state), as truncated BPTT does
for the recurrent models. A block's output at position i depends on the block inputs i - C .. i, all
computed from their own full windows: scoring chunk by chunk is scoring the whole stream at once, and
parallel streams join exactly (bench.models.base) once L * C words of a stream have been re-scored. At the
start of a stream the memory is empty: its places are masked until words fill them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bench.data import Vocabulary
from bench.errors import BenchError
from bench.models.base import LanguageModel


class Block(nn.Module):
    """One pre-norm block: windowed multi-head causal self-attention with relative bias, then feed-forward."""

    def __init__(self, width: int, heads: int, feedforward_size: int, context: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.attention_norm = nn.LayerNorm(width)
        self.query = nn.Linear(width, width)
        self.key_value = nn.Linear(width, 2 * width)
        self.project = nn.Linear(width, width)
        self.distance_bias = nn.Parameter(torch.zeros(heads, context + 1))  # r^h[d], d = 0..C
        self.feedforward_norm = nn.LayerNorm(width)
        self.feedforward = nn.Sequential(nn.Linear(width, feedforward_size), nn.ReLU(), nn.Dropout(dropout),
                                         nn.Linear(feedforward_size, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, allowed: torch.Tensor,
                distance: torch.Tensor) -> torch.Tensor:
        """x (B, T, H) the chunk, memory (B, C, H) the block's inputs before it; allowed (B, T, C+T) which keys
        each query may attend to, distance (T, C+T) query minus key position, clamped to 0..C."""
        batch, steps, width = x.shape
        size = width // self.heads
        window = self.attention_norm(torch.cat([memory, x], dim=1))
        query = self.query(window[:, -steps:]).view(batch, steps, self.heads, size).transpose(1, 2)
        key, value = self.key_value(window).view(batch, -1, 2, self.heads, size).permute(2, 0, 3, 1, 4)
        scores = query @ key.transpose(-1, -2) / math.sqrt(size) + self.distance_bias[:, distance]
        weights = self.drop(scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1))
        attended = (weights @ value).transpose(1, 2).reshape(batch, steps, width)
        x = x + self.drop(self.project(attended))
        return x + self.drop(self.feedforward(self.feedforward_norm(x)))


class TransformerLM(LanguageModel):
    STATE_BATCH_DIM = 1  # memory (L, B, C, H) and which of its places hold a word (1, B, C)
    # PTB: about the LSTM 2x200's size (5.0M parameters, 4.6M of them the 10k-word embedding and softmax),
    # trained the way small Transformers are: Adam, clipping, halving the rate when validation stalls.
    DEFAULTS = dict(optimizer="adam", lr=1e-3, batch_size=32, bptt=128, clip=1.0, max_epochs=20)
    # `bench run` on synthetic: a few seconds an epoch on one core
    QUICK = dict(hidden_size=64, feedforward_size=256, context=32, bptt=32, dropout=0.0, lr=3e-3, max_epochs=6)

    def __init__(self, vocab: Vocabulary, hidden_size: int = 200, layers: int = 2, heads: int = 4,
                 feedforward_size: int = 800, context: int = 128, dropout: float = 0.1, **options):
        for name, value in (("hidden_size", hidden_size), ("layers", layers), ("heads", heads),
                            ("feedforward_size", feedforward_size), ("context", context)):
            if value < 1:
                raise BenchError(f"{name} must be at least 1, got {value}")
        if hidden_size % heads:
            raise BenchError(f"hidden_size ({hidden_size}) must be a multiple of heads ({heads})")
        if not 0 <= dropout < 1:
            raise BenchError(f"dropout must be between 0 and 1, got {dropout}")
        super().__init__(vocab, hidden_size, **options)
        self.context = context
        self.embedding = nn.Embedding(len(vocab), hidden_size)
        self.blocks = nn.ModuleList(Block(hidden_size, heads, feedforward_size, context, dropout)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(hidden_size)
        self.drop = nn.Dropout(dropout)

    def init_state(self, batch_size: int):
        memory = torch.zeros(len(self.blocks), batch_size, self.context, self.norm.normalized_shape[0],
                             device=self.device)
        return memory, torch.zeros(1, batch_size, self.context, dtype=torch.bool, device=self.device)

    def hidden_flops_per_token(self) -> float:
        """Per block: the query, key, value and output products (8 H^2), the feed-forward (4 H F), and
        attention to the C + 1 words of the window (4 H (C + 1)); the memory's keys and values, computed again
        every chunk, are not counted."""
        width, block = self.norm.normalized_shape[0], self.blocks[0]
        feedforward = block.feedforward[0].out_features
        return len(self.blocks) * (8.0 * width**2 + 4.0 * width * feedforward + 4.0 * width * (self.context + 1))

    def forward(self, inputs: torch.Tensor, state):
        memory, filled = state
        steps, context = inputs.shape[1], self.context
        queries = torch.arange(context, context + steps, device=inputs.device)
        distance = queries[:, None] - torch.arange(context + steps, device=inputs.device)[None, :]
        words = torch.cat([filled[0], torch.ones_like(inputs, dtype=torch.bool)], dim=1)  # (B, C+T)
        allowed = ((distance >= 0) & (distance <= context))[None] & words[:, None, :]
        distance = distance.clamp(0, context)
        x = self.drop(self.embedding(inputs))
        memories = []
        for block, past in zip(self.blocks, memory):
            memories.append(torch.cat([past, x], dim=1)[:, -context:])
            x = block(x, past, allowed, distance)
        return self.drop(self.norm(x)), (torch.stack(memories), words[None, :, -context:])
