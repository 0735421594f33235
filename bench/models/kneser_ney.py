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

Memory is bounded by the model, not the corpus (WikiText-103: 103M tokens).  The corpus is counted in
chunks of about ``chunk_size`` tokens cut after a ``</s>`` (no n-gram crosses a sentence end), one order
at a time: each chunk's sorted keys and counts (a run) and its tokens' n-gram indices go to a temporary
folder, and the runs are merged one key range at a time.  The estimate goes through each table in blocks
of about ``chunk_size`` n-grams holding whole contexts, so that every sum over a context is one
``np.bincount`` in table order, as over the whole table: any chunk size gives the same bits.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from bench.data import Vocabulary
from bench.errors import BenchError
from bench.models.base import LanguageModel

_FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)


class KneserNey:
    """Interpolated modified Kneser-Ney estimator of a given order over ids ``0 .. vocab_size-1``.

    ``chunk_size``: the most tokens counted, or n-grams estimated, at once; the model is the same for any
    value.  Counting a chunk of the default 4M tokens peaks at 0.38 GB (tracemalloc, i.i.d. Zipf words).
    """

    def __init__(self, order: int, vocab_size: int, eos_id: int, chunk_size: int = 1 << 22):
        if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or not 1 <= order <= 9:
            raise BenchError(f"order must be between 1 and 9, got {order}")
        if int(vocab_size) < 1:
            raise BenchError(f"vocab_size must be positive, got {vocab_size}")
        if not 0 <= int(eos_id) < int(vocab_size):
            raise BenchError(f"eos_id must be in 0..{int(vocab_size) - 1}, got {eos_id}")
        if int(chunk_size) < 1:
            raise BenchError(f"chunk_size must be positive, got {chunk_size}")
        self.order = int(order)
        self.vocab_size = int(vocab_size)
        self.eos_id = int(eos_id)
        self.chunk_size = int(chunk_size)
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
        """Estimate from `tokens`, a 1-D array of integer ids (a memory map too: it is read chunk by chunk)."""
        tokens = self._checked(tokens)
        with tempfile.TemporaryDirectory(prefix="bench-kn-") as spill:
            tables = self._count_tables(tokens, Path(spill))
        self._estimate(self._adjusted_counts(tables), tables)
        self._fitted = True
        return self

    def _checked(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise BenchError(f"tokens must be a 1-D array, got shape {tokens.shape}")
        if tokens.size == 0:
            raise BenchError("the training corpus is empty")
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise BenchError(f"token ids must be in 0..{self.vocab_size - 1}")
        return tokens

    def _chunk_bounds(self, tokens: np.ndarray) -> list[tuple[int, int]]:
        """[start, end) of consecutive pieces of about chunk_size tokens, each but the last ending with </s>
        (a longer sentence makes a longer piece)."""
        bounds, start = [], 0
        while start < tokens.size:
            end = min(start + self.chunk_size, tokens.size)
            while end < tokens.size and tokens[end - 1] != self.eos_id:
                ahead = tokens[end:end + self.chunk_size]
                ends = np.flatnonzero(ahead == self.eos_id)
                end += int(ends[0]) + 1 if ends.size else ahead.size
            bounds.append((start, end))
            start = end
        return bounds

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

    def _count_tables(self, tokens: np.ndarray, spill: Path) -> dict:
        """Per order m (index m-1), bottom-up: how many m-grams, their raw counts where used (_raw_used),
        each one's suffix as an (m-1)-gram index, and whether it starts with <s>; fills self._keys.
        `spill`: a folder for the runs.

        In `spill`, per order m and chunk c, as raw int64: ``m-c-keys``/``m-c-counts``, the run;
        ``m-c-run-index``, the run index of the m-gram ending at each position of the chunk (-1: none);
        ``m-c-index``, the same as an index of table m, which the chunk's (m+1)-gram keys are made of."""
        radix = self.radix
        chunks = [tokens[start:end] for start, end in self._chunk_bounds(tokens)]  # views: nothing copied
        unigrams = sum(np.bincount(chunk, minlength=radix) for chunk in chunks)
        bos_first = np.arange(radix) == self.bos_id
        tables = {"n_grams": [radix], "raw": [self._raw_used(1, unigrams, bos_first)], "suffix": [None],
                  "bos_first": [bos_first]}
        self._keys = [None]
        for m in range(2, self.order + 1):
            for c, chunk in enumerate(chunks):
                words, position = self._with_sentence_starts(chunk)
                below = words if m == 2 else np.fromfile(spill / f"{m - 1}-{c}-index", dtype=np.int64)
                at = np.flatnonzero(position >= m - 2)
                keys, index, counts = np.unique(below[at - 1] * radix + words[at], return_inverse=True,
                                                return_counts=True)
                run_index = np.full(words.size, -1, dtype=np.int64)
                run_index[at] = index
                for name, array in (("keys", keys), ("counts", counts), ("run-index", run_index)):
                    array.astype(np.int64, copy=False).tofile(spill / f"{m}-{c}-{name}")
            keys, raw = self._merged_runs(spill, m, len(chunks))
            for c in range(len(chunks)):
                if m < self.order:
                    table_index = np.searchsorted(keys, np.fromfile(spill / f"{m}-{c}-keys", dtype=np.int64))
                    run_index = np.fromfile(spill / f"{m}-{c}-run-index", dtype=np.int64)
                    np.where(run_index >= 0, table_index[run_index], -1).tofile(spill / f"{m}-{c}-index")
                for name in (f"{m}-{c}-keys", f"{m}-{c}-counts", f"{m}-{c}-run-index", f"{m - 1}-{c}-index"):
                    (spill / name).unlink(missing_ok=True)
            self._keys.append(keys)
            suffix, bos_first = self._suffixes(m, tables["suffix"][m - 2], tables["bos_first"][m - 2])
            tables["n_grams"].append(keys.size)
            tables["raw"].append(self._raw_used(m, raw, bos_first))
            tables["suffix"].append(suffix)
            tables["bos_first"].append(bos_first)
        return tables

    def _raw_used(self, m: int, raw: np.ndarray, bos_first: np.ndarray) -> np.ndarray:
        """The raw counts of table m that the adjusted counts read: all at the top order, else the <s>-initial
        m-grams' in table order (the others' is a continuation count). Below KN5's top order, 50M tokens of
        i.i.d. words hold 118M n-grams, so keeping all would take 0.9 GB more."""
        return raw if m == self.order else raw[bos_first]

    def _merged_runs(self, spill: Path, m: int, chunks: int) -> tuple[np.ndarray, np.ndarray]:
        """The sorted keys of the runs of order m and each one's summed count. The key space is cut at
        quantiles of the first run into one range a chunk; each range is read from every run, merged and
        appended to a file, and the files are read back at the end, so that memory holds about one run
        besides the table (a list of merged ranges joined at the end would hold the table twice)."""
        def run(c: int, name: str, start: int = 0, count: int = -1) -> np.ndarray:
            return np.fromfile(spill / f"{m}-{c}-{name}", dtype=np.int64, offset=8 * start, count=count)

        first = run(0, "keys")
        edges = first[(np.arange(1, chunks) * first.size) // chunks]
        del first
        cuts = []
        for c in range(chunks):
            keys = run(c, "keys")
            cuts.append(np.concatenate([[0], np.searchsorted(keys, edges), [keys.size]]))
        paths = spill / f"{m}-keys", spill / f"{m}-counts"
        with open(paths[0], "wb") as keys_out, open(paths[1], "wb") as counts_out:
            for r in range(chunks):
                keys, counts = (np.concatenate([run(c, name, cut[r], cut[r + 1] - cut[r])
                                                for c, cut in enumerate(cuts)]) for name in ("keys", "counts"))
                if keys.size == 0:
                    continue
                order = np.argsort(keys, kind="stable")
                keys, counts = keys[order], counts[order]
                new = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
                keys[new].tofile(keys_out)
                np.add.reduceat(counts, new).tofile(counts_out)
        merged = tuple(np.fromfile(path, dtype=np.int64) for path in paths)
        for path in paths:
            path.unlink()
        return merged

    def _suffixes(self, m: int, suffix_below: np.ndarray | None, bos_first_below: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
        """Each m-gram's suffix (itself less its first word) as an (m-1)-gram index -- for a bigram its
        word, above the (m-1)-gram (suffix of its context, word) -- and whether it starts with <s>, from
        the tables below; a block of chunk_size m-grams at a time."""
        keys = self._keys[m - 1]
        suffix = np.empty(keys.size, dtype=np.int64)
        bos_first = np.empty(keys.size, dtype=bool)
        for start in range(0, keys.size, self.chunk_size):
            block = slice(start, start + self.chunk_size)
            context, word = np.divmod(keys[block], self.radix)
            suffix[block] = word if m == 2 else self._lookup(m - 1, suffix_below[context], word)
            bos_first[block] = bos_first_below[context]
        return suffix, bos_first

    def _adjusted_counts(self, tables: dict) -> list[np.ndarray]:
        """Raw counts at the top order and for <s>-initial n-grams, else continuation counts; frees the raw
        counts and <s> flags."""
        order, raw = self.order, tables.pop("raw")
        bos_first = tables.pop("bos_first")
        adjusted: list[np.ndarray] = [None] * order  # type: ignore[list-item]
        adjusted[order - 1] = raw[order - 1]
        for m in range(order - 1, 0, -1):
            adjusted[m - 1] = np.bincount(tables["suffix"][m], minlength=tables["n_grams"][m - 1])
            adjusted[m - 1][bos_first[m - 1]] = raw[m - 1]
            raw[m - 1] = bos_first[m - 1] = None
        adjusted[0][self.bos_id] = 0
        return adjusted

    def _blocks(self, m: int) -> Iterator[tuple[int, int]]:
        """[start, end) ranges of about chunk_size m-grams covering table m, each holding whole contexts."""
        keys = self._keys[m - 1]
        if keys is None:
            yield 0, self.radix
            return
        start = 0
        while start < keys.size:
            end = min(start + self.chunk_size, keys.size)
            if end < keys.size:  # on to the first key of the next context
                end = int(np.searchsorted(keys, (keys[end - 1] // self.radix + 1) * self.radix))
            yield start, end
            start = end

    def _estimate(self, adjusted: list[np.ndarray], tables: dict) -> None:
        """Discounts, log p of every stored m-gram and log gamma of every context, bottom-up, block by
        block; frees each order's adjusted counts and suffixes once used, and keeps p itself only for the
        order above (the top order's p would be one more array the size of the largest table)."""
        self.discounts = {}
        self._logp, self._loggamma = [], []
        lower = np.full(self.radix, 1.0 / self.vocab_size)  # p of the level below (uniform; <s> never read)
        for m in range(1, self.order + 1):
            counts_all, suffix = adjusted[m - 1], tables["suffix"][m - 1]
            d = self._estimate_discounts(counts_all)
            self.discounts[m] = d
            p_all = np.empty(counts_all.size) if m < self.order else None
            logp = np.empty(counts_all.size)
            loggamma = np.zeros(1 if m == 1 else tables["n_grams"][m - 2])  # log 1: a context never seen
            for start, end in self._blocks(m):
                counts = counts_all[start:end]
                discount = np.array([0.0, d[0], d[1], d[2]])[np.minimum(counts, 3)]
                context = (np.zeros(counts.size, dtype=np.int64) if m == 1
                           else self._keys[m - 1][start:end] // self.radix)
                first = int(context[0])
                context -= first
                denominator = np.bincount(context, weights=counts)
                mass = np.bincount(context, weights=np.where(counts > 0, discount, 0.0))
                with np.errstate(divide="ignore", invalid="ignore"):
                    gamma = np.where(denominator > 0, mass / denominator, 1.0)
                    discounted = np.maximum(counts - discount, 0.0) / denominator[context]
                discounted = np.where(counts > 0, discounted, 0.0)
                below = lower if m == 1 else lower[suffix[start:end]]
                p = discounted + gamma[context] * below
                if m == 1:
                    p[self.bos_id] = 0.0
                if p_all is not None:
                    p_all[start:end] = p
                with np.errstate(divide="ignore"):
                    logp[start:end] = np.log(p)
                    loggamma[first:first + gamma.size] = np.log(gamma)
            self._logp.append(logp)
            self._loggamma.append(loggamma)
            adjusted[m - 1] = tables["suffix"][m - 1] = None
            lower = p_all

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
            tokens = targets[mask].cpu().numpy()
            del targets, mask  # 9 bytes a token less while counting (0.9 GB on WikiText-103)
            self._train_chunks = []
            self.estimator.fit(tokens)

    def on_train_epoch_end(self):
        self.trainer.should_stop = True  # counting is done in one pass

    def configure_optimizers(self):
        return None

    def results(self, epochs: int) -> dict:
        """The perplexities, and the discounts D1, D2, D3+ estimated for each order n (key "n")."""
        discounts = {str(n): list(d) for n, d in sorted(self.estimator.discounts.items())}
        return super().results(epochs) | {"kn_discounts": discounts}
