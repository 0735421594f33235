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
from typing import NamedTuple

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


def _product_dtypes(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """The dtype of the within-class products (autocast's, when it is on) and of the logits (float32 or
    better): the layer casts by hand, as autocast has no rule for its custom backward."""
    device = hidden.device.type
    product = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    return product, torch.promote_types(weight.dtype, torch.float32)


# A sparse gradient of more rows than this share of the vocabulary is sent dense: autograd drops the coalesced
# flag, so clipping coalesces it again and scales it through the sparse kernels, which cost more per row than a
# dense pass (profiled on PTB, 100 classes, 128 streams, nearly every row touched: coalescing and scaling took
# about 6 ms a step, of about 17). Either way the gradient, and the SGD step, are the same.
SPARSE_ROWS_BELOW = 0.25


def _sparse_rows(sparse: bool, rows: torch.Tensor, weight_shape) -> bool:
    return sparse and len(rows) < SPARSE_ROWS_BELOW * weight_shape[0]


def _row_gradients(rows, row_grad, bias_grad, weight_shape, sparse: bool):
    """The word rows' gradients from those of the rows `rows` (ascending, distinct): sparse when asked and the
    rows are few (SPARSE_ROWS_BELOW), else dense with zero rows elsewhere."""
    if _sparse_rows(sparse, rows, weight_shape):
        index = rows.unsqueeze(0)
        return (torch.sparse_coo_tensor(index, row_grad, weight_shape, is_coalesced=True, check_invariants=False),
                torch.sparse_coo_tensor(index, bias_grad, weight_shape[:1], is_coalesced=True,
                                        check_invariants=False))
    return (row_grad.new_zeros(weight_shape).index_copy_(0, rows, row_grad),
            bias_grad.new_zeros(weight_shape[:1]).index_copy_(0, rows, bias_grad))


class ClassSegments(NamedTuple):
    """A step's targets grouped by class for one product per class present (WithinClassNLL), worked out on
    the host from the targets alone (ClassSoftmax.plan), so that the step never asks the device for a size.
    The logits of token i are a row as long as its class, all rows end to end in one flat buffer."""

    tokens: torch.Tensor  # (M,) the scored tokens (class wider than one word), grouped by class
    classes: tuple  # (first word, end word, first of its tokens, tokens) of each class present, in order
    rows: torch.Tensor  # (R,) the word rows of the classes present, ascending
    token_width: torch.Tensor  # (M,) each token's logit row length: its class's size
    row_of: torch.Tensor  # (L,) the token of each flat logit
    logit_word: torch.Tensor  # (L,) the word of each flat logit
    logit_row: torch.Tensor  # (L,) the place of that word among `rows`
    target_at: torch.Tensor  # (M,) each token's target logit in the flat buffer


class WithinClassNLL(torch.autograd.Function):
    """-log p(w | c(w), h) of the plan's tokens, one (n_c x H) @ (H x |c|) product per class present forward
    and three backward, on slices of the word rows (no copies), the log-normalisers of all rows in a few
    flat operations. On one CPU thread this beats one batched product over padded blocks
    (BatchedWithinClassNLL), whose gathers and padding cost more than the loop's calls (PTB, 100 classes,
    one batch's forward products with their gathers, blocks of 16: 0.8 against 4.2 ms at 32 streams, 2.1
    against 8.7 at 128; other block widths and tiles were no better)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: ClassSegments, sparse: bool):
        dtype, accumulate = _product_dtypes(hidden, weight)
        with torch.autocast(hidden.device.type, enabled=False):
            grouped, low_weight = hidden.to(dtype)[plan.tokens], weight.to(dtype)
            logits = grouped.new_empty(len(plan.row_of))
            offset = 0
            for first, end, token, n in plan.classes:
                block = logits[offset:offset + n * (end - first)].view(n, end - first)
                torch.mm(grouped[token:token + n], low_weight[first:end].t(), out=block)
                offset += block.numel()
            logits = logits.to(accumulate).add_(bias.to(accumulate)[plan.logit_word])
            # log-sum-exp of every row at once, shifted by the row's maximum for stability
            peak = torch.segment_reduce(logits, "max", lengths=plan.token_width)
            shifted_exp = (logits - peak[plan.row_of]).exp_()
            log_norm = torch.segment_reduce(shifted_exp, "sum", lengths=plan.token_width).log_().add_(peak)
        ctx.save_for_backward(grouped, low_weight, logits, log_norm)
        ctx.plan, ctx.sparse, ctx.shapes = plan, sparse, (hidden.shape, hidden.dtype, weight.shape, weight.dtype)
        return log_norm - logits[plan.target_at]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        # d nll_i / d logit_ij = softmax_ij - [j = target_i], scaled by the incoming grad_i
        grouped, low_weight, logits, log_norm = ctx.saved_tensors
        plan, (hidden_shape, hidden_dtype, weight_shape, weight_dtype) = ctx.plan, ctx.shapes
        grad = grad.to(logits.dtype)
        dlogits = (logits - log_norm[plan.row_of]).exp_().mul_(grad[plan.row_of])
        dlogits[plan.target_at] -= grad
        dlogits_low = dlogits.to(grouped.dtype)
        grad_grouped = torch.empty_like(grouped)
        # the rows' gradients end to end (sparse), or in place in the dense gradient
        sparse = _sparse_rows(ctx.sparse, plan.rows, weight_shape)
        rows = len(plan.rows) if sparse else weight_shape[0]
        row_grad = grouped.new_zeros(rows, weight_shape[1])
        # the bias's in one call, not a sum per class (PTB, 100 classes, one thread, forward and backward of
        # 20 batches alternated: 4.37 -> 3.71 ms a batch at 16 streams, 6.43 -> 5.69 at 32, 8.71 -> 8.25 at 128)
        bias_grad = dlogits.new_zeros(rows).index_add_(0, plan.logit_row if sparse else plan.logit_word, dlogits)
        offset, row = 0, 0
        for first, end, token, n in plan.classes:
            size, at = n * (end - first), row if sparse else first
            block = dlogits_low[offset:offset + size].view(n, end - first)
            torch.mm(block, low_weight[first:end], out=grad_grouped[token:token + n])
            torch.mm(block.t(), grouped[token:token + n], out=row_grad[at:at + end - first])
            offset, row = offset + size, row + end - first
        grad_hidden = grad_grouped.new_zeros(hidden_shape).index_copy_(0, plan.tokens, grad_grouped)
        row_grad, bias_grad = row_grad.to(weight_dtype), bias_grad.to(weight_dtype)
        if sparse:
            row_grad, bias_grad = _row_gradients(plan.rows, row_grad, bias_grad, weight_shape, True)
        return grad_hidden.to(hidden_dtype), row_grad, bias_grad, None, None


class ClassPlan(NamedTuple):
    """How a step's targets meet the word rows of their classes, worked out on the host from the targets
    alone (ClassSoftmax.plan), so that the step itself never asks the device for a size.

    Tokens whose class has more than one word are grouped by class into tiles of `tile` tokens, and every
    class into blocks of `BLOCK` consecutive word rows (the last one padded); a pair is one tile against
    one block of its class, and the step's within-class logits are one batched product over the pairs,
    (P, tile, H) @ (P, H, BLOCK). A padded token slot reads token 0 and gets no gradient; a padded column
    reads the class's last row and gets the logit -inf.
    """

    tokens: torch.Tensor  # (M,) the scored tokens (class wider than one word), grouped by class
    token_slot: torch.Tensor  # (M,) each one's place in the flat (tiles x tile) grid
    tile_tokens: torch.Tensor  # (tiles, tile) the token in each slot (0 in a padded one)
    pair_tile: torch.Tensor  # (P,) the tile of each pair
    pair_rows: torch.Tensor  # (P, BLOCK) the word row of each column of each pair
    pair_mask: torch.Tensor  # (P, BLOCK) 0, or -inf on a padded column
    pair_slot: torch.Tensor  # (P * BLOCK,) each column's place among `rows`, len(rows) for a padded one
    rows: torch.Tensor  # (R,) the word rows the step touches, ascending
    target_at: torch.Tensor  # (M,) each token's target logit in the flat (P, tile, BLOCK) logits


class BatchedWithinClassNLL(torch.autograd.Function):
    """-log p(w | c(w), h) of the plan's tokens: one batched product forward, two backward, whatever the
    number of classes present (ClassPlan): for devices where a call costs more than a copy (a GPU's kernel
    launches), and measured slower on one CPU thread (WithinClassNLL).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: ClassPlan, sparse: bool):
        dtype, accumulate = _product_dtypes(hidden, weight)
        with torch.autocast(hidden.device.type, enabled=False):
            tiles = hidden.to(dtype)[plan.tile_tokens][plan.pair_tile]  # (P, tile, H)
            rows = weight.to(dtype)[plan.pair_rows]  # (P, BLOCK, H)
            logits = torch.bmm(tiles, rows.transpose(1, 2)).to(accumulate)
            logits += (bias.to(accumulate)[plan.pair_rows] + plan.pair_mask).unsqueeze(1)
            # log-sum-exp over each tile's pairs, shifted by the tile's maximum for stability
            shape = (len(plan.tile_tokens), plan.tile_tokens.shape[1])
            peak = logits.new_full(shape, -math.inf).index_reduce_(0, plan.pair_tile, logits.amax(2), "amax")
            total = logits.new_zeros(shape).index_add_(0, plan.pair_tile,
                                                       (logits - peak[plan.pair_tile].unsqueeze(2)).exp().sum(2))
            log_norm = total.log_().add_(peak)
        ctx.save_for_backward(tiles, rows, logits, log_norm)
        ctx.plan, ctx.sparse, ctx.shapes = plan, sparse, (hidden.shape, hidden.dtype, weight.shape, weight.dtype)
        return log_norm.view(-1)[plan.token_slot] - logits.view(-1)[plan.target_at]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        # d nll_i / d logit_ij = softmax_ij - [j = target_i], scaled by the incoming grad_i
        tiles, rows, logits, log_norm = ctx.saved_tensors
        plan, (hidden_shape, hidden_dtype, weight_shape, weight_dtype) = ctx.plan, ctx.shapes
        grad = grad.to(logits.dtype)
        slot_grad = logits.new_zeros(log_norm.numel()).index_copy_(0, plan.token_slot, grad).view_as(log_norm)
        dlogits = (logits - log_norm[plan.pair_tile].unsqueeze(2)).exp_().mul_(slot_grad[plan.pair_tile].unsqueeze(2))
        dlogits.view(-1).index_add_(0, plan.target_at, -grad)
        dlogits_low = dlogits.to(tiles.dtype)
        tile_grad = tiles.new_zeros(plan.tile_tokens.shape + tiles.shape[2:]).index_add_(
            0, plan.pair_tile, torch.bmm(dlogits_low, rows))
        grad_hidden = tiles.new_zeros(hidden_shape).index_add_(0, plan.tile_tokens.view(-1),
                                                               tile_grad.view(-1, hidden_shape[1]))
        # every column's gradient summed into its word row; padded columns into a spare last row
        spare = len(plan.rows) + 1
        row_grad = torch.bmm(dlogits_low.transpose(1, 2), tiles).view(-1, weight_shape[1])
        row_grad = row_grad.new_zeros(spare, weight_shape[1]).index_add_(0, plan.pair_slot, row_grad)[:-1]
        bias_grad = dlogits.new_zeros(spare).index_add_(0, plan.pair_slot, dlogits.sum(1).view(-1))[:-1]
        grad_weight, grad_bias = _row_gradients(plan.rows, row_grad.to(weight_dtype), bias_grad.to(weight_dtype),
                                                weight_shape, ctx.sparse)
        return grad_hidden.to(hidden_dtype), grad_weight, grad_bias, None, None


def plan_to(plan: ClassSegments | ClassPlan | None, device: torch.device) -> ClassSegments | ClassPlan | None:
    """The plan with its tensors on `device`."""
    return plan and type(plan)(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in plan))


class ClassSoftmax(nn.Module):
    """Class-factorised softmax: p(w | h) = p(c(w) | h) p(w | c(w), h), classes of contiguous word ids.

    `sparse_rows` (set by the language model under SGD without L2): the word rows' gradient is sparse, a row
    per word of the classes a step saw, so the optimizer and the clipping touch those rows only -- when they
    are few (SPARSE_ROWS_BELOW of the vocabulary). It is the same gradient as the dense one, whose other rows
    are zero: the step is the same. The class rows get a
    dense gradient either way, since every class's logit is in every token's normaliser.
    """

    BLOCK = 16  # word rows per block of a class (ClassPlan)

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
        self.sparse_rows = False
        # None: one batched product on a GPU, one product per class elsewhere (WithinClassNLL says why)
        self.batched_products: bool | None = None
        # a training token's class size, averaged over the training words (the within-class product's width)
        size = np.diff(class_start)[word_class]
        self.mean_class_size = float((counts * size).sum() / max(counts.sum(), 1))
        # the plans read the assignment on the host: a copy of the buffers, renewed when they are loaded
        self._keep_host_copy()
        self.register_load_state_dict_post_hook(lambda module, _: module._keep_host_copy())

    def _keep_host_copy(self) -> None:
        self._host = tuple(b.detach().cpu().numpy() for b in (self.word_class, self.word_pos, self.class_start))

    def sparse_parameters(self) -> list[nn.Parameter]:
        """The parameters whose gradients are sparse."""
        return list(self.word_decoder.parameters()) if self.sparse_rows else []

    def plan(self, target: torch.Tensor) -> ClassSegments | ClassPlan | None:
        """How the targets `target` (N,) meet their classes' word rows, from a host copy of them: a
        ClassPlan for one batched product, or ClassSegments for one product per class (batched_products);
        None when no target's class has more than one word."""
        word_class, word_pos, class_start = self._host
        target = target.cpu().numpy()
        cls, width = word_class[target], np.diff(class_start)
        tokens = np.flatnonzero(width[cls] > 1)
        if not len(tokens):
            return None
        tokens = tokens[np.argsort(cls[tokens], kind="stable")]
        present, first_token, tokens_per_class = np.unique(cls[tokens], return_index=True, return_counts=True)
        position = word_pos[target[tokens]]
        batched = self.word_decoder.weight.is_cuda if self.batched_products is None else self.batched_products
        if batched:
            return self._batched_plan(tokens, present, first_token, tokens_per_class, position)
        token_width = width[cls[tokens]]
        row_start = np.cumsum(token_width) - token_width
        row_of = np.repeat(np.arange(len(tokens)), token_width)
        logit_word = class_start[cls[tokens]][row_of] + np.arange(len(row_of)) - row_start[row_of]
        class_width = width[present]
        rows = (np.repeat(class_start[present], class_width) + np.arange(class_width.sum())
                - np.repeat(np.cumsum(class_width) - class_width, class_width))
        classes = tuple(zip(class_start[present].tolist(), class_start[present + 1].tolist(), first_token.tolist(),
                            tokens_per_class.tolist()))
        arrays = dict(tokens=tokens, rows=rows, token_width=token_width, row_of=row_of, logit_word=logit_word,
                      logit_row=np.searchsorted(rows, logit_word), target_at=row_start + position)
        return ClassSegments(classes=classes, **{name: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
                                                 for name, a in arrays.items()})

    def _batched_plan(self, tokens, present, first_token, tokens_per_class, position) -> ClassPlan:
        _, _, class_start = self._host
        width = np.diff(class_start)
        # tiles as wide as the mean count of a class present, to a power of two (1 at one stream)
        tile = min(32, 1 << math.ceil(math.log2(len(tokens) / len(present))))
        tiles = -(-tokens_per_class // tile)
        blocks = -(-width[present] // self.BLOCK)
        first_tile, first_block = np.cumsum(tiles) - tiles, np.cumsum(blocks) - blocks
        # tokens: their class's tiles, in order
        which = np.repeat(np.arange(len(present)), tokens_per_class)
        place = np.arange(len(tokens)) - first_token[which]
        token_tile = first_tile[which] + place // tile
        token_slot = token_tile * tile + place % tile
        tile_tokens = np.zeros(tiles.sum() * tile, dtype=np.int64)
        tile_tokens[token_slot] = tokens
        # blocks: BLOCK consecutive rows of a class, the last one padded
        block_class = np.repeat(np.arange(len(present)), blocks)
        columns = (class_start[present][block_class] + (np.arange(blocks.sum()) - first_block[block_class])
                   * self.BLOCK)[:, None] + np.arange(self.BLOCK)
        class_end = class_start[present + 1][block_class][:, None]
        real = columns < class_end
        rows = columns[real]
        slot = np.full(real.shape, len(rows))
        slot[real] = np.arange(len(rows))
        # pairs: each tile of a class against each block of it, tile-major
        pairs = tiles * blocks
        first_pair = np.cumsum(pairs) - pairs
        pair_class = np.repeat(np.arange(len(present)), pairs)
        within = np.arange(pairs.sum()) - first_pair[pair_class]
        pair_tile = first_tile[pair_class] + within // blocks[pair_class]
        pair_block = first_block[pair_class] + within % blocks[pair_class]
        token_pair = first_pair[which] + (token_tile - first_tile[which]) * blocks[which] + position // self.BLOCK
        target_at = (token_pair * tile + place % tile) * self.BLOCK + position % self.BLOCK
        arrays = dict(tokens=tokens, token_slot=token_slot, tile_tokens=tile_tokens.reshape(-1, tile),
                      pair_tile=pair_tile, pair_rows=np.minimum(columns, class_end - 1)[pair_block],
                      pair_slot=slot[pair_block].reshape(-1), rows=rows, target_at=target_at)
        plan = {name: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)) for name, a in arrays.items()}
        pair_mask = torch.from_numpy(np.where(real[pair_block], 0.0, -math.inf).astype(np.float32))
        return ClassPlan(pair_mask=pair_mask, **plan)

    def forward(self, hidden: torch.Tensor, target: torch.Tensor, plan=None) -> torch.Tensor:
        """-log p(target | hidden) for hidden (N, H) and target (N,): returns (N,).

        Only the class logits and the logits of the target's class are computed, so no token pays for the
        vocabulary or for the largest class. `plan` is self.plan(target), made from a host copy of the
        targets when not given (a device sync where the targets live on a GPU).
        """
        cls = self.word_class[target]
        nll = F.cross_entropy(self.class_decoder(hidden), cls, reduction="none")
        if plan is None:
            plan = plan_to(self.plan(target), hidden.device)
        # In a one-word class p(w | c, h) = 1: those tokens (the most frequent words) need nothing more.
        if plan is None:
            return nll
        products = BatchedWithinClassNLL if isinstance(plan, ClassPlan) else WithinClassNLL
        word_nll = products.apply(hidden, self.word_decoder.weight, self.word_decoder.bias, plan, self.sparse_rows)
        return nll.index_add(0, plan.tokens, word_nll.to(nll.dtype))

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
        """-log p(target | hidden) for hidden (N, H) and target (N,): returns (N,). In fp32 under mixed precision:
        torch's layer copies its clusters' log-probabilities, in autocast's dtype on a CPU, into a buffer of
        the input's dtype, which index_copy_ refuses."""
        with torch.autocast(hidden.device.type, enabled=False):
            return -self.adaptive(hidden.to(self.adaptive.head.weight.dtype), target).output

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
