"""Output layers: turn a hidden vector h into -log p(w | h) over the vocabulary.

Every sequence model of the registry ends in one of these, chosen by the `output` hyper-parameter, so any
model can be combined with any output layer. Word ids are sorted by descending training frequency
(see bench.data.Vocabulary), which the frequency-based layers rely on.

    full:      p(w | h) = softmax(V h + b)_w                            cost per token ~ |V|
    class:     p(w | h) = softmax(W_c h + b_c)_c(w)                     cost per token ~ C + |c(w)|
                          * softmax_{v in c(w)}(W_v h + b_v)_w
    adaptive:  p(w | h) = softmax(A h)_w         w in the shortlist     cost per token ~ |shortlist| + K
               p(w | h) = softmax(A h)_i         w in tail cluster i      (+ (H + |cluster i|) / d^i
                          * softmax(T_i P_i h)_w   (i = 1..K)              for a word of cluster i)

Costs count multiply-adds of length H; d = div_value, and P_i projects H to H / d^i.

`class` (Mikolov et al. 2011, the rnnlm toolkit) splits the vocabulary into C classes of contiguous word ids
by unigram mass (`class_binning` "frequency": count / total, or "sqrt": sqrt(count) / sum sqrt(count)), so
each class carries about 1/C of that mass; with C ~ sqrt(|V|) the cost drops from |V| to ~2 sqrt(|V|).
`adaptive` is torch.nn.AdaptiveLogSoftmaxWithLoss (Grave et al. 2017): a head over the `cutoffs[0]` most
frequent words plus one entry per tail cluster; rare words pay more, but through a smaller projection.
"""

from __future__ import annotations

import heapq
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from bench.errors import BenchError

CLASS_BINNINGS = ("frequency", "sqrt")


class FullSoftmax(nn.Module):
    """The ordinary softmax over the whole vocabulary."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__()
        self.decoder = nn.Linear(hidden_size, vocab_size)

    def forward(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """-log p(target | hidden) for hidden (N, H) and target (N,): returns (N,)."""
        return F.cross_entropy(self.decoder(hidden), target, reduction="none")

    def flops_per_token(self) -> float:
        """Multiply-add FLOPs (2 per multiply-add) of one token's forward pass."""
        return 2.0 * self.decoder.in_features * self.decoder.out_features

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """log p(w | hidden) for every word: (N, V). Used by tests and interpolation, not in training."""
        return F.log_softmax(self.decoder(hidden), dim=-1)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_classes(classes, vocab_size: int) -> None:
    if not _is_int(classes) or not 1 <= classes <= vocab_size:
        raise BenchError(f"classes must be between 1 and |V|={vocab_size}, got {classes!r}", "classes")


def check_cutoffs(cutoffs, vocab_size: int) -> None:
    if (not isinstance(cutoffs, (list, tuple)) or not cutoffs or not all(_is_int(c) for c in cutoffs)
            or cutoffs[0] <= 0 or cutoffs[-1] >= vocab_size or any(a >= b for a, b in zip(cutoffs, cutoffs[1:]))):
        raise BenchError(f"cutoffs must be increasing and below |V|={vocab_size}, got {cutoffs!r}", "cutoffs")


def check_fits_vocabulary(config: dict, vocab_size: int) -> None:
    """The output-layer settings of a run configuration that depend on the corpus's vocabulary size, checked
    before a run (or a whole sweep) starts rather than when the model is built."""
    if config.get("output") == "class" and config.get("classes") is not None:
        check_classes(config["classes"], vocab_size)
    if config.get("output") == "adaptive" and config.get("cutoffs") is not None:
        check_cutoffs(config["cutoffs"], vocab_size)


def bin_classes(counts: np.ndarray, classes: int, binning: str = "frequency") -> np.ndarray:
    """The class of every word id (non-decreasing, each of the `classes` classes non-empty).

    The rnnlm toolkit's walk: go through the words in id order (descending count) accumulating their share
    of the mass; a word joins the current class, and the class closes once the cumulative mass exceeds
    (c + 1) / C. A class closes only after a word, so when C is close to |V| the words can run out before
    the thresholds do (C = |V| with equal counts: word i brings the mass to exactly (i + 1) / C, which does
    not exceed it); the missing classes come from halving the largest class (by words) until there are C,
    which also covers words of zero count.
    """
    vocab_size = len(counts)
    check_classes(classes, vocab_size)
    if binning not in CLASS_BINNINGS:
        raise BenchError(f"class_binning must be one of {', '.join(CLASS_BINNINGS)}, got {binning!r}")
    mass = np.asarray(counts, dtype=np.float64)
    if binning == "sqrt":
        mass = np.sqrt(mass)
    total = mass.sum()
    cumulative = np.cumsum(mass) / total if total > 0 else np.zeros(vocab_size)
    word_class = np.empty(vocab_size, dtype=np.int64)
    current = 0
    for word, df in enumerate(cumulative.tolist()):
        word_class[word] = current
        if df > (current + 1) / classes and current < classes - 1:
            current += 1
    bounds = np.searchsorted(word_class, np.arange(word_class[-1] + 2))
    heap = [(start - end, start, end) for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist())]
    heapq.heapify(heap)
    while len(heap) < classes:  # some class has >= 2 words, since there are fewer classes than words
        _, start, end = heapq.heappop(heap)
        middle = (start + end) // 2
        heapq.heappush(heap, (start - middle, start, middle))
        heapq.heappush(heap, (middle - end, middle, end))
    starts = np.array(sorted(start for _, start, _ in heap))
    return np.repeat(np.arange(classes), np.diff(np.append(starts, vocab_size)))


class WithinClassNLL(torch.autograd.Function):
    """-log p(w | c(w), h) for tokens sorted by class: one (n_c x H) @ (H x |c|) product per class present.

    Forward and backward are written out because autograd's version of this loop records about ten
    operations per class and per step, and a parameter per class costs the optimizer and the gradient
    clipping several more each; by hand it is one product per class forward and three backward, on one
    |V| x H matrix, with the log-normalisers of all rows in a few flat operations (measured on PTB,
    C = 100, hidden 200, 2 threads, 640 tokens a step: a whole training step 12.4 -> 9.5 ms). Untouched
    classes get zero rows of the dense gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, word_pos, classes):
        """hidden (N, H) sorted by class; word_pos (N,) each target's place in its class; classes: (first
        word, end word, tokens) of each class present, in order. Returns (N,)."""
        # The logits live in one flat buffer, a row per token as long as its class: the block of class c
        # is an (n_c x |c|) matrix, and a token's target logit is at its row's start + word_pos.
        widths, counts = torch.tensor([[end - first, n] for first, end, n in classes], device=hidden.device).T
        row_width = widths.repeat_interleave(counts)
        row_end = row_width.cumsum(0)
        logits = hidden.new_empty(int(row_end[-1]))
        offset, token = 0, 0
        for first, end, n in classes:
            block = logits[offset:offset + n * (end - first)].view(n, end - first)
            torch.addmm(bias[first:end], hidden[token:token + n], weight[first:end].t(), out=block)
            offset, token = offset + block.numel(), token + n
        # log-sum-exp of every row at once, shifted by the row's maximum for stability
        row_of = torch.arange(len(hidden), device=hidden.device).repeat_interleave(row_width)
        peak = torch.segment_reduce(logits, "max", lengths=row_width)
        shifted_exp = (logits - peak[row_of]).exp_()
        log_norm = torch.segment_reduce(shifted_exp, "sum", lengths=row_width).log_().add_(peak)
        target_at = row_end - row_width + word_pos
        ctx.save_for_backward(hidden, weight, logits, log_norm, row_of, target_at)
        ctx.classes = classes
        return log_norm - logits[target_at]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        # d nll_i / d logit_ij = softmax_ij - [j = target_i], scaled by the incoming grad_i
        hidden, weight, logits, log_norm, row_of, target_at = ctx.saved_tensors
        dlogits = (logits - log_norm[row_of]).exp_().mul_(grad[row_of])
        dlogits[target_at] -= grad
        grad_hidden = torch.empty_like(hidden)
        grad_weight, grad_bias = torch.zeros_like(weight), weight.new_zeros(len(weight))
        offset, token = 0, 0
        for first, end, n in ctx.classes:
            block = dlogits[offset:offset + n * (end - first)].view(n, end - first)
            torch.mm(block, weight[first:end], out=grad_hidden[token:token + n])
            torch.mm(block.t(), hidden[token:token + n], out=grad_weight[first:end])
            torch.sum(block, 0, out=grad_bias[first:end])
            offset, token = offset + block.numel(), token + n
        return grad_hidden, grad_weight, grad_bias, None, None


class ClassSoftmax(nn.Module):
    """Class-factorised softmax: p(w | h) = p(c(w) | h) p(w | c(w), h), classes of contiguous word ids."""

    def __init__(self, hidden_size: int, counts: np.ndarray, classes: int | None = None,
                 class_binning: str = "frequency"):
        super().__init__()
        vocab_size = len(counts)
        if classes is None:
            classes = max(1, round(math.sqrt(vocab_size)))
        word_class = bin_classes(counts, classes, class_binning)
        class_start = np.searchsorted(word_class, np.arange(classes + 1))
        # Buffers, not recomputed on load: the assignment is part of the model and saved in checkpoints.
        self.register_buffer("word_class", torch.from_numpy(word_class))
        self.register_buffer("word_pos", torch.from_numpy(np.arange(vocab_size) - class_start[word_class]))
        self.register_buffer("class_start", torch.from_numpy(class_start))
        self.class_decoder = nn.Linear(hidden_size, classes)
        self.word_decoder = nn.Linear(hidden_size, vocab_size)  # row w scores word w within its class
        # a training token's class size, averaged over the training words (the within-class product's width)
        size = np.diff(class_start)[word_class]
        self.mean_class_size = float((counts * size).sum() / max(counts.sum(), 1))

    def forward(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """-log p(target | hidden) for hidden (N, H) and target (N,): returns (N,).

        Only the class logits and the logits of the target's class are computed: tokens are grouped by
        class and each class present costs one (n_c x H) @ (H x |c|) product, so no token pays for the
        vocabulary or for the largest class.
        """
        cls = self.word_class[target]
        nll = F.cross_entropy(self.class_decoder(hidden), cls, reduction="none")
        # In a one-word class p(w | c, h) = 1: those tokens (the most frequent words) need nothing more.
        sizes = self.class_start[cls + 1] - self.class_start[cls]
        tokens = torch.nonzero(sizes > 1).squeeze(1)
        if tokens.numel() == 0:
            return nll
        tokens = tokens[torch.argsort(cls[tokens], stable=True)]
        present, tokens_per_class = torch.unique_consecutive(cls[tokens], return_counts=True)
        classes = list(zip(self.class_start[present].tolist(), self.class_start[present + 1].tolist(),
                           tokens_per_class.tolist()))
        word_nll = WithinClassNLL.apply(hidden.index_select(0, tokens), self.word_decoder.weight,
                                        self.word_decoder.bias, self.word_pos[target[tokens]], classes)
        return nll.index_add(0, tokens, word_nll)

    def flops_per_token(self) -> float:
        """Multiply-add FLOPs of one token's forward pass: the class logits and its class's word logits."""
        return 2.0 * self.class_decoder.in_features * (self.class_decoder.out_features + self.mean_class_size)

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """log p(w | hidden) for every word: (N, V). Used by tests and interpolation, not in training."""
        class_lp = F.log_softmax(self.class_decoder(hidden), dim=-1)
        logits = self.word_decoder(hidden)
        index = self.word_class.expand_as(logits)
        # Log-sum-exp within each class, shifted by the class maximum for stability; the shift cancels,
        # so it carries no gradient.
        shift = logits.new_full(class_lp.shape, -math.inf).scatter_reduce(1, index, logits.detach(), "amax")
        shifted = logits - shift.gather(1, index)
        log_norm = torch.zeros_like(class_lp).scatter_add(1, index, shifted.exp()).log()
        return class_lp.gather(1, index) + shifted - log_norm.gather(1, index)


class AdaptiveSoftmax(nn.Module):
    """torch.nn.AdaptiveLogSoftmaxWithLoss (Grave et al. 2017) behind the interface of the other layers."""

    def __init__(self, hidden_size: int, counts: np.ndarray, cutoffs=None, div_value: float = 4.0):
        super().__init__()
        vocab_size = len(counts)
        if cutoffs is None:  # head ~ the most frequent 20% of the vocabulary, two tail clusters
            cutoffs = sorted({min(max(round(f * vocab_size), 1), vocab_size - 1) for f in (0.2, 0.6)})
        check_cutoffs(cutoffs, vocab_size)
        if not isinstance(div_value, (int, float)) or isinstance(div_value, bool) or not div_value > 0:
            raise BenchError(f"div_value must be a positive number, got {div_value!r}")
        self.adaptive = nn.AdaptiveLogSoftmaxWithLoss(hidden_size, vocab_size, [int(c) for c in cutoffs],
                                                      div_value=float(div_value))
        # each tail cluster's share of the training tokens (word ids are sorted by count)
        bounds = [*self.adaptive.cutoffs[:-1], vocab_size]
        self.cluster_mass = [float(counts[a:b].sum() / max(counts.sum(), 1)) for a, b in zip(bounds, bounds[1:])]

    def forward(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """-log p(target | hidden) for hidden (N, H) and target (N,): returns (N,)."""
        return -self.adaptive(hidden, target).output

    def flops_per_token(self) -> float:
        """Multiply-add FLOPs of one token's forward pass: the head, and a tail cluster's projection and
        logits for the tokens of that cluster."""
        head = self.adaptive.head
        tails = sum(mass * sum(2.0 * layer.in_features * layer.out_features for layer in tail)
                    for mass, tail in zip(self.cluster_mass, self.adaptive.tail))
        return 2.0 * head.in_features * head.out_features + tails

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """log p(w | hidden) for every word: (N, V). Used by tests and interpolation, not in training."""
        return self.adaptive.log_prob(hidden)


OUTPUT_OPTIONS = {"full": (), "class": ("classes", "class_binning"), "adaptive": ("cutoffs", "div_value")}
OUTPUT_LAYERS = tuple(OUTPUT_OPTIONS)


def build_output_layer(kind: str, hidden_size: int, counts: np.ndarray, **options) -> nn.Module:
    """The output layer named `kind` for a vocabulary with training counts `counts` (sorted descending)."""
    if kind not in OUTPUT_OPTIONS:
        raise BenchError(f"unknown output layer {kind!r}: choose one of {', '.join(OUTPUT_LAYERS)}")
    unknown = sorted(set(options) - set(OUTPUT_OPTIONS[kind]))
    if unknown:
        allowed = ", ".join(OUTPUT_OPTIONS[kind]) or "none"
        raise BenchError(f"unknown option(s) {', '.join(unknown)} for output layer {kind!r} (allowed: {allowed})")
    if kind == "class":
        return ClassSoftmax(hidden_size, counts, **options)
    if kind == "adaptive":
        return AdaptiveSoftmax(hidden_size, counts, **options)
    return FullSoftmax(hidden_size, len(counts))
