r"""Interpolated modified Kneser-Ney n-gram model (Chen & Goodman 1998), with the conventions of KenLM's ``lmplz``.

Chen, S. F. and Goodman, J. (1998). *An Empirical Study of Smoothing Techniques for Language Modeling*.
Technical Report TR-10-98, Harvard University.  KenLM: Heafield et al. (2013), *Scalable Modified
Kneser-Ney Language Model Estimation*, ACL.

Counts.  Every sentence is ``<s> w_1 ... w_k </s>`` (``</s>`` is ``eos_id``; ``<s>`` is an internal id,
context only, never predicted).  n-grams may hold ``<s>`` only in their first position, so left-padding
with several ``<s>`` is the same as one.  The adjusted count ``a(x)`` of an n-gram ``x`` is

* its raw count ``c(x)`` at the highest order N, and for every n-gram that begins with ``<s>``
  (it cannot be extended to the left);
* otherwise its continuation count ``N1+(. x) = |{v : c(v x) > 0}|`` (``v`` may be ``<s>``).

Discounts, per order n, from the count-of-counts ``n_k`` (number of n-grams with ``a = k``)::

    Y   = n1 / (n1 + 2 n2)
    D1  = 1 - 2 Y n2 / n1
    D2  = 2 - 3 Y n3 / n2
    D3+ = 3 - 4 Y n4 / n3          D(a) = D1, D2, D3+ for a = 1, 2, >= 3

(If this closed form fails, i.e. some n_k = 0 or D_j outside [0, j], the order falls back to
KenLM's ``--discount_fallback`` default ``(0.5, 1.0, 1.5)``.)

Interpolation, for a context ``h`` of n-1 words and its suffix ``h'`` (h without its first word)::

    p(w | h)  = (a(h w) - D(a(h w)))^+ / sum_v a(h v)  +  gamma(h) p(w | h')
    gamma(h)  = (D1 N1(h .) + D2 N2(h .) + D3+ N3+(h .)) / sum_v a(h v)

where ``N_k(h .)`` counts the words following ``h`` with adjusted count k (3+: at least 3).  The
recursion ends in the uniform distribution ``p(w) = 1/|V|`` over the ``vocab_size`` ids.  A context never
seen in training has ``gamma = 1`` (pure back-off to the next lower order).

Implementation: n-gram tables are sorted ``int64`` key arrays built hierarchically,
``key(h w) = index(h in the sorted (n-1)-gram table) * (|V|+1) + w``, so keys stay small at any order;
counting uses ``np.unique`` / ``np.bincount`` and lookups ``np.searchsorted``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from bench.data import Vocabulary
from bench.errors import BenchError
from bench.models.base import LanguageModel

_FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)


class KneserNey:
    """Interpolated modified Kneser-Ney estimator of a given order over ids ``0 .. vocab_size-1``."""

    def __init__(self, order: int, vocab_size: int, eos_id: int):
        if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or not 1 <= order <= 9:
            raise BenchError(f"order must be between 1 and 9, got {order}")
        if int(vocab_size) < 1:
            raise BenchError(f"vocab_size must be positive, got {vocab_size}")
        if not 0 <= int(eos_id) < int(vocab_size):
            raise BenchError(f"eos_id must be in 0..{int(vocab_size) - 1}, got {eos_id}")
        self.order = int(order)
        self.vocab_size = int(vocab_size)
        self.eos_id = int(eos_id)
        self.bos_id = self.vocab_size  # internal <s>: context only
        self.radix = self.vocab_size + 1
        self.discounts: dict[int, tuple[float, float, float]] = {}
        # per order m (index m-1): sorted keys (None for unigrams: direct indexing), log p(w|h) of each
        # stored m-gram, and log gamma of each (m-1)-gram used as context (a 1-element array at m = 1).
        self._keys: list[np.ndarray | None] = []
        self._logp: list[np.ndarray] = []
        self._loggamma: list[np.ndarray] = []
        self._fitted = False

    # ------------------------------------------------------------------ estimation
    @staticmethod
    def _estimate_discounts(adjusted: np.ndarray) -> tuple[float, float, float]:
        nk = np.bincount(np.minimum(adjusted, 5), minlength=6)[1:5].astype(np.float64)
        n1, n2, n3, n4 = nk
        with np.errstate(divide="ignore", invalid="ignore"):
            y = n1 / (n1 + 2.0 * n2)
            d = (1.0 - 2.0 * y * n2 / n1, 2.0 - 3.0 * y * n3 / n2, 3.0 - 4.0 * y * n4 / n3)
        if all(np.isfinite(x) and 0.0 <= x <= j for j, x in enumerate(d, start=1)):
            return tuple(float(x) for x in d)
        return _FALLBACK_DISCOUNTS

    def fit(self, tokens: np.ndarray) -> KneserNey:
        tokens = self._checked(tokens)
        words, position = self._with_sentence_starts(tokens)
        tables = self._count_tables(tokens, words, position)
        self._estimate(self._adjusted_counts(tables), tables)
        self._fitted = True
        return self

    def _checked(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise BenchError(f"tokens must be a 1-D array, got shape {tokens.shape}")
        if tokens.size == 0:
            raise BenchError("the training corpus is empty")
        tokens = tokens.astype(np.int64, copy=False)
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise BenchError(f"token ids must be in 0..{self.vocab_size - 1}")
        return tokens

    def _with_sentence_starts(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The tokens with one <s> before each sentence, and each one's position within its sentence (-1
        for <s>)."""
        start = np.ones(tokens.size, dtype=bool)
        start[1:] = tokens[:-1] == self.eos_id
        sentence = np.cumsum(start) - 1
        first = np.flatnonzero(start)
        words = np.full(tokens.size + int(sentence[-1]) + 1, self.bos_id, dtype=np.int64)
        shifted = np.arange(tokens.size) + sentence + 1
        words[shifted] = tokens
        position = np.full(words.size, -1, dtype=np.int64)
        position[shifted] = np.arange(tokens.size) - first[sentence]
        return words, position

    def _count_tables(self, tokens: np.ndarray, words: np.ndarray, position: np.ndarray) -> dict:
        """Per order m (index m-1), bottom-up: how many m-grams, their raw counts, each one's context and
        suffix as (m-1)-gram indices, and whether it starts with <s>; fills self._keys."""
        radix = self.radix
        ids = [words]  # ids[m-1][p]: index of the m-gram ending at position p (-1: none)
        tables = {"n_grams": [radix], "raw": [np.bincount(tokens, minlength=radix)], "context": [None],
                  "suffix": [None], "bos_first": [np.arange(radix) == self.bos_id]}
        self._keys = [None]
        for m in range(2, self.order + 1):
            at = np.flatnonzero(position >= m - 2)
            keys, index = np.unique(ids[m - 2][at - 1] * radix + words[at], return_inverse=True)
            ids.append(np.full(words.size, -1, dtype=np.int64))
            ids[-1][at] = index
            suffix = np.empty(keys.size, dtype=np.int64)
            suffix[index] = ids[m - 2][at]  # the m-gram less its first word, as an (m-1)-gram index
            context = keys // radix
            tables["n_grams"].append(keys.size)
            tables["raw"].append(np.bincount(index, minlength=keys.size))
            tables["context"].append(context)
            tables["suffix"].append(suffix)
            tables["bos_first"].append(tables["bos_first"][m - 2][context])
            self._keys.append(keys)
        return tables

    def _adjusted_counts(self, tables: dict) -> list[np.ndarray]:
        """Raw counts at the top order and for <s>-initial n-grams, else continuation counts."""
        order, raw = self.order, tables["raw"]
        adjusted: list[np.ndarray] = [None] * order  # type: ignore[list-item]
        adjusted[order - 1] = raw[order - 1]
        for m in range(order - 1, 0, -1):
            continuations = np.bincount(tables["suffix"][m], minlength=tables["n_grams"][m - 1])
            adjusted[m - 1] = np.where(tables["bos_first"][m - 1], raw[m - 1], continuations)
        adjusted[0] = adjusted[0].copy()
        adjusted[0][self.bos_id] = 0
        return adjusted

    def _estimate(self, adjusted: list[np.ndarray], tables: dict) -> None:
        """Discounts, log p of every stored m-gram and log gamma of every context, bottom-up."""
        self.discounts = {}
        self._logp, self._loggamma = [], []
        lower = np.full(self.radix, 1.0 / self.vocab_size)  # p of the level below (uniform; <s> never read)
        for m in range(1, self.order + 1):
            counts = adjusted[m - 1]
            d = self._estimate_discounts(counts)
            self.discounts[m] = d
            discount = np.array([0.0, d[0], d[1], d[2]])[np.minimum(counts, 3)]
            n_contexts = 1 if m == 1 else tables["n_grams"][m - 2]
            context = np.zeros(counts.size, dtype=np.int64) if m == 1 else tables["context"][m - 1]
            denominator = np.bincount(context, weights=counts, minlength=n_contexts)
            mass = np.bincount(context, weights=np.where(counts > 0, discount, 0.0), minlength=n_contexts)
            with np.errstate(divide="ignore", invalid="ignore"):
                gamma = np.where(denominator > 0, mass / denominator, 1.0)
                discounted = np.maximum(counts - discount, 0.0) / denominator[context]
            discounted = np.where(counts > 0, discounted, 0.0)
            below = lower if m == 1 else lower[tables["suffix"][m - 1]]
            p = discounted + gamma[context] * below
            if m == 1:
                p[self.bos_id] = 0.0
            with np.errstate(divide="ignore"):
                self._logp.append(np.log(p))
                self._loggamma.append(np.log(gamma))
            lower = p

    # ------------------------------------------------------------------ scoring
    def _lookup(self, m: int, prefix: np.ndarray, word: np.ndarray) -> np.ndarray:
        """Index of the m-gram (prefix m-1-gram index, word) in table m, or -1; prefix -1 stays -1."""
        keys = self._keys[m - 1]
        out = np.full(prefix.shape, -1, dtype=np.int64)
        ok = prefix >= 0
        if keys.size == 0 or not ok.any():
            return out
        k = prefix[ok] * self.radix + word[ok]
        i = np.minimum(np.searchsorted(keys, k), keys.size - 1)
        out[ok] = np.where(keys[i] == k, i, -1)
        return out

    def log_prob(self, contexts: np.ndarray, targets: np.ndarray) -> np.ndarray:
        if not self._fitted:
            raise BenchError("KneserNey.log_prob called before fit")
        N = self.order
        targets = np.asarray(targets, dtype=np.int64).reshape(-1)
        contexts = np.asarray(contexts, dtype=np.int64)
        if contexts.ndim == 1 and N - 1 == 0:
            contexts = contexts.reshape(-1, 0)
        if contexts.ndim != 2 or contexts.shape != (targets.size, N - 1):
            raise BenchError(
                f"contexts must have shape ({targets.size}, {N - 1}), got {tuple(contexts.shape)}"
            )
        if targets.size and (targets.min() < 0 or targets.max() >= self.vocab_size):
            raise BenchError(f"target ids must be in 0..{self.vocab_size - 1}")
        if contexts.size and (contexts.min() < -1 or contexts.max() >= self.vocab_size):
            raise BenchError(f"context ids must be in -1..{self.vocab_size - 1}")
        n = targets.size
        # Sentence boundary: the last -1 / eos in a row and everything older become <s>.
        boundary = (contexts == -1) | (contexts == self.eos_id)
        cols = np.arange(N - 1)
        last = np.where(boundary, cols, -1).max(axis=1, initial=-1)
        ctx = np.where(cols[None, :] <= last[:, None], self.bos_id, contexts)
        row = np.concatenate([ctx, targets[:, None]], axis=1)  # (n, N)

        # g[m-1][:, col] = index of the m-gram ending at column col (-1 if absent).
        g = [row]
        for m in range(2, N + 1):
            gm = np.full((n, N), -1, dtype=np.int64)
            for col in range(m - 1, N):
                gm[:, col] = self._lookup(m, g[m - 2][:, col - 1], row[:, col])
            g.append(gm)

        # Longest stored m-gram ending in the target, times gamma of every longer seen context.
        out = self._logp[0][targets].copy()
        for m in range(2, N + 1):
            hit = g[m - 1][:, N - 1]
            h = g[m - 2][:, N - 2]  # context (m-1)-gram
            found = hit >= 0
            lg = np.zeros(n)
            seen = h >= 0
            lg[seen] = self._loggamma[m - 1][h[seen]]
            out = np.where(found, self._logp[m - 1][np.maximum(hit, 0)], out + lg)
        return out

    def log_prob_stream(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        k = self.order - 1
        padded = np.concatenate([np.full(k, -1, dtype=np.int64), tokens])
        contexts = np.lib.stride_tricks.sliding_window_view(padded, k + 1)[:, :k]
        return self.log_prob(contexts, tokens)

    def distribution(self, context: Sequence[int]) -> np.ndarray:
        k = self.order - 1
        ctx = [int(c) for c in context][-k:] if k else []
        ctx = [-1] * (k - len(ctx)) + ctx
        contexts = np.tile(np.asarray(ctx, dtype=np.int64), (self.vocab_size, 1)).reshape(self.vocab_size, k)
        return np.exp(self.log_prob(contexts, np.arange(self.vocab_size)))


class KneserNeyLM(LanguageModel):
    """The estimator as a Lightning module, so it runs, is timed and is recorded like every other model.

    "Training" is one pass over the training stream with no gradient: the targets of every training chunk
    are collected (chunk columns of the B streams give back the corpus in order, see bench.data) and the
    counts are estimated on the epoch's last batch, before validation. The state carried across chunks
    is the last order-1 words of each stream; -1 marks "before the stream", i.e. <s>.
    """

    def __init__(self, vocab: Vocabulary, order: int = 5):
        super().__init__(vocab, None)
        self.automatic_optimization = False
        self.estimator = KneserNey(order, len(vocab), vocab.eos)
        self._train_chunks: list[tuple[torch.Tensor, torch.Tensor]] = []

    def init_state(self, batch_size: int) -> torch.Tensor:
        return torch.full((batch_size, self.estimator.order - 1), -1, dtype=torch.long)

    def nll(self, inputs: torch.Tensor, targets: torch.Tensor, state: torch.Tensor):
        window = torch.cat([state, inputs], dim=1)
        width = self.estimator.order - 1
        contexts = window.unfold(1, width, 1)[:, 1:] if width else window.new_empty(*targets.shape, 0)
        # the estimator counts in numpy on the host, wherever the batch is
        log_p = self.estimator.log_prob(contexts.reshape(-1, width).cpu().numpy(), targets.reshape(-1).cpu().numpy())
        return torch.from_numpy(-log_p).to(targets.device).view_as(targets), window[:, window.shape[1] - width:]

    def training_step(self, batch, batch_idx):
        self._train_chunks.append((batch[1], batch[2]))
        if batch_idx == self.trainer.num_training_batches - 1:
            targets = torch.cat([t for t, _ in self._train_chunks], dim=1).reshape(-1)
            mask = torch.cat([m for _, m in self._train_chunks], dim=1).reshape(-1)
            self.estimator.fit(targets[mask].cpu().numpy())
            self._train_chunks = []

    def on_train_epoch_end(self):
        self.trainer.should_stop = True  # counting is done in one pass

    def configure_optimizers(self):
        return None

    def results(self, epochs: int) -> dict:
        """The perplexities, and the discounts D1, D2, D3+ estimated for each order n (key "n")."""
        discounts = {str(n): list(d) for n, d in sorted(self.estimator.discounts.items())}
        return super().results(epochs) | {"kn_discounts": discounts}
