"""Output layers: exact normalisation, forward == -log_probs[target], class binning, gradients, options."""

import copy

import numpy as np
import pytest
import torch

from bench.errors import BenchError
from bench.models import output_layers
from bench.models.output_layers import OUTPUT_LAYERS, ClassSoftmax, bin_classes, build_output_layer

H = 8
COUNTS = np.array([40, 25, 13, 9, 7, 6, 5, 4, 3, 3, 2, 2, 1, 1, 1, 0, 0])  # sorted descending, zeros at the end
V = len(COUNTS)

LAYERS = {
    "full": ("full", {}),
    "class C=1": ("class", {"classes": 1}),
    "class C=7": ("class", {"classes": 7}),
    "class C=|V|": ("class", {"classes": V}),
    "class C=7 sqrt": ("class", {"classes": 7, "class_binning": "sqrt"}),
    "class default": ("class", {}),
    "adaptive": ("adaptive", {"cutoffs": [3, 9], "div_value": 2.0}),
    "adaptive default": ("adaptive", {}),
}


def make(name: str, seed: int = 0) -> torch.nn.Module:
    kind, options = LAYERS[name]
    torch.manual_seed(seed)
    layer = build_output_layer(kind, H, COUNTS, **options).double()
    with torch.no_grad():  # non-zero biases and larger weights, so the test is not about near-uniform outputs
        for parameter in layer.parameters():
            parameter.normal_(0.0, 1.0)
    return layer


def inputs(n: int = 23, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=generator, dtype=torch.float64)
    target = torch.randint(0, V, (n,), generator=generator)
    return hidden, target


def test_the_cases_here_cover_every_output_layer():
    assert {kind for kind, _ in LAYERS.values()} == set(OUTPUT_LAYERS)


@pytest.mark.parametrize("name", LAYERS)
def test_log_probs_normalised(name):
    hidden, _ = inputs()
    log_probs = make(name).log_probs(hidden)
    assert log_probs.shape == (len(hidden), V)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(len(hidden), dtype=torch.float64),
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", LAYERS)
def test_forward_is_minus_log_prob_of_target(name):
    hidden, target = inputs()
    layer = make(name)
    nll = layer(hidden, target)
    assert nll.shape == target.shape
    torch.testing.assert_close(nll, -layer.log_probs(hidden)[torch.arange(len(target)), target],
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", LAYERS)
def test_forward_float32(name):
    hidden, target = inputs()
    layer = make(name).float()
    nll = layer(hidden.float(), target)
    assert nll.dtype == torch.float32 and torch.isfinite(nll).all() and (nll >= 0).all()
    torch.testing.assert_close(layer.log_probs(hidden.float()).exp().sum(-1), torch.ones(len(hidden)),
                               rtol=0, atol=1e-5)


def test_class_with_one_class_is_the_full_softmax():
    full, single = make("full"), make("class C=1", seed=5)
    with torch.no_grad():
        single.word_decoder.load_state_dict(full.decoder.state_dict())
    hidden, target = inputs()
    torch.testing.assert_close(single(hidden, target), full(hidden, target), rtol=0, atol=1e-12)
    torch.testing.assert_close(single.log_probs(hidden), full.log_probs(hidden), rtol=0, atol=1e-12)


def test_class_binning_by_hand():
    counts = np.array([50, 20, 10, 10, 5, 5])
    # cumulative mass .5 .7 .8 .9 .95 1: "the" passes 1/3, the next word passes 2/3, the rest fill class 2
    assert bin_classes(counts, 3).tolist() == [0, 1, 2, 2, 2, 2]
    # sqrt mass, cumulative .32 .52 .66 .80 .90 1: thresholds 1/3 and 2/3 are passed by words 1 and 3
    assert bin_classes(counts, 3, "sqrt").tolist() == [0, 0, 1, 1, 2, 2]
    assert bin_classes(counts, 1).tolist() == [0] * 6
    assert bin_classes(counts, 6).tolist() == [0, 1, 2, 3, 4, 5]
    # a heavy word passes several thresholds; the next words then close one class each
    assert bin_classes(np.array([90, 3, 3, 2, 2]), 4).tolist() == [0, 1, 2, 3, 3]
    # cumulative .25 .5 .75 1 never exceeds the next threshold before the words run out: the walk gives
    # [0, 0, 1, 2], and the fourth class comes from halving the largest
    assert bin_classes(np.ones(4), 4).tolist() == [0, 1, 2, 3]
    # zero counts carry no mass but still get a class
    assert bin_classes(np.zeros(5), 3).tolist() == [0, 0, 1, 2, 2]


@pytest.mark.parametrize("binning", ["frequency", "sqrt"])
@pytest.mark.parametrize("classes", [1, 2, 5, 7, 16, 17])
def test_class_assignment_covers_every_word_once(classes, binning):
    layer = ClassSoftmax(H, COUNTS, classes, binning)
    word_class, word_pos, class_start = layer.word_class, layer.word_pos, layer.class_start
    assert torch.equal(word_class, torch.from_numpy(bin_classes(COUNTS, classes, binning)))
    assert torch.equal(class_start.diff(), torch.bincount(word_class, minlength=classes))  # sizes from the bins
    assert (word_pos < class_start.diff()[word_class]).all()
    assert class_start[0] == 0 and class_start[-1] == V and len(class_start) == classes + 1
    assert (class_start.diff() > 0).all()  # exactly C classes, none empty
    # word w is row class_start[c(w)] + pos(w): each row, i.e. each word, exactly once
    assert sorted((class_start[word_class] + word_pos).tolist()) == list(range(V))
    assert set(layer.state_dict()) >= {"word_class", "word_pos", "class_start"}


def test_class_frequency_binning_balances_mass():
    counts = np.floor(1e6 / np.arange(1, 10_001)).astype(np.int64)  # Zipf
    word_class = bin_classes(counts, 100)
    mass = np.bincount(word_class, weights=counts) / counts.sum()
    assert len(mass) == 100 and (np.diff(word_class) >= 0).all()
    assert np.bincount(word_class)[0] == 1 and np.bincount(word_class)[-1] > 500  # head alone, tail big
    assert mass[5:].max() < 2 / 100


@pytest.mark.parametrize("name", ["class C=7", "class C=7 sqrt", "class C=|V|", "adaptive"])
def test_gradcheck(name):
    kind, options = LAYERS[name]
    torch.manual_seed(0)
    layer = build_output_layer(kind, 3, COUNTS, **options).double()  # H = 3 keeps the Jacobian small
    hidden = torch.randn(V, 3, dtype=torch.float64, requires_grad=True)
    target = torch.arange(V)  # every word once: every class, every adaptive cluster
    parameters = tuple(layer.parameters())

    def nll(hidden, *values):
        return torch.func.functional_call(layer, dict(zip(dict(layer.named_parameters()), values)),
                                          (hidden, target))

    assert torch.autograd.gradcheck(nll, (hidden, *(p.detach().requires_grad_() for p in parameters)))


@pytest.mark.parametrize("kind, options, message", [
    ("class", {"classes": 0}, "classes must be between 1 and |V|=17, got 0"),
    ("class", {"classes": V + 1}, "classes must be between 1 and |V|=17, got 18"),
    ("class", {"classes": 2.5}, "classes must be between"),
    ("class", {"class_binning": "log"}, "class_binning must be one of frequency, sqrt"),
    ("adaptive", {"cutoffs": [5, 5]}, "cutoffs must be increasing and below |V|=17, got [5, 5]"),
    ("adaptive", {"cutoffs": [8, 4]}, "cutoffs must be increasing"),
    ("adaptive", {"cutoffs": [4, V]}, "cutoffs must be increasing and below |V|=17, got [4, 17]"),
    ("adaptive", {"cutoffs": [0, 4]}, "cutoffs must be increasing"),
    ("adaptive", {"cutoffs": []}, "cutoffs must be increasing"),
    ("adaptive", {"div_value": 0}, "div_value must be a positive number"),
    ("full", {"classes": 3}, "unknown option(s) classes for output layer 'full'"),
    ("class", {"cutoffs": [3]}, "unknown option(s) cutoffs for output layer 'class'"),
    ("hierarchical", {}, "unknown output layer 'hierarchical'"),
])
def test_bad_options(kind, options, message):
    with pytest.raises(BenchError) as error:
        build_output_layer(kind, H, COUNTS, **options)
    assert message in str(error.value) and "\n" not in str(error.value)


def class_nll_by_hand(layer: ClassSoftmax, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log p(target) from the class softmax's definition: the full class softmax, then the full softmax
    over the target class's words, each token on its own (the reference for the layer's kernels)."""
    nll = []
    for h, w in zip(hidden, target.tolist()):
        c = int(layer.word_class[w])
        first, end = int(layer.class_start[c]), int(layer.class_start[c + 1])
        class_lp = torch.log_softmax(layer.class_decoder(h), -1)[c]
        word_lp = torch.log_softmax(layer.word_decoder.weight[first:end] @ h + layer.word_decoder.bias[first:end],
                                    -1)[w - first]
        nll.append(-(class_lp + word_lp))
    return torch.stack(nll)


def loss_and_gradients(layer, hidden, target, weights, forward):
    hidden = hidden.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    loss = (forward(layer, hidden, target) * weights).sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    return loss.detach(), hidden.grad, grads


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("classes", [1, 3, 7])
def test_class_kernels_equal_the_softmax_within_the_class_by_hand(monkeypatch, classes, batched, sparse):
    """Loss and every gradient, float64, against the formula token by token: 60 tokens with a weight each
    (the incoming gradient), blocks of 4 rows, so that classes span several blocks and tiles; sparse
    gradients however many rows the step touches."""
    monkeypatch.setattr(ClassSoftmax, "BLOCK", 4)
    monkeypatch.setattr(output_layers, "SPARSE_ROWS_BELOW", 1.01)
    layer = build_output_layer("class", H, COUNTS, classes=classes).double()
    torch.manual_seed(3)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_(0.0, 1.0)
    layer.batched_products, layer.sparse_rows = batched, sparse
    hidden, target = inputs(60, seed=4)
    weights = torch.rand(60, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    loss, grad_hidden, grads = loss_and_gradients(layer, hidden, target, weights, lambda m, h, t: m(h, t))
    ref_loss, ref_hidden, ref_grads = loss_and_gradients(layer, hidden, target, weights, class_nll_by_hand)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-10)
    torch.testing.assert_close(grad_hidden, ref_hidden, rtol=0, atol=1e-10)
    for name in ref_grads:
        torch.testing.assert_close(grads[name].to_dense(), ref_grads[name], rtol=0, atol=1e-10)
    assert grads["word_decoder.weight"].is_sparse == grads["word_decoder.bias"].is_sparse == sparse
    if sparse:  # the rows of the classes present, and only those
        present = torch.unique(layer.word_class[target])
        rows = torch.cat([torch.arange(layer.class_start[c], layer.class_start[c + 1]) for c in present
                          if layer.class_start[c + 1] - layer.class_start[c] > 1])
        assert torch.equal(grads["word_decoder.weight"].coalesce().indices()[0], rows)


@pytest.mark.parametrize("batched", [False, True])
def test_class_layer_float32_and_bf16_autocast(batched):
    """float32 to 1e-6 of the float64 formula; under bf16 autocast the products run in bf16 (8 bits of
    mantissa) and the logits, loss and gradients stay float32, within bf16's rounding of the float32 ones."""
    layer = make("class C=7").float()
    layer.batched_products = batched
    hidden, target = inputs(60, seed=6)
    hidden = hidden.float()
    weights = torch.ones(60)
    loss, grad_hidden, grads = loss_and_gradients(layer, hidden, target, weights, lambda m, h, t: m(h, t))
    ref_loss, _, ref_grads = loss_and_gradients(copy.deepcopy(layer).double(), hidden.double(), target,
                                                weights.double(), class_nll_by_hand)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=0)
    for name in ref_grads:
        torch.testing.assert_close(grads[name].double(), ref_grads[name], rtol=0, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_loss, low_hidden, low_grads = loss_and_gradients(layer, hidden, target, weights,
                                                             lambda m, h, t: m(h, t))
    assert low_loss.dtype == torch.float32 and low_hidden.dtype == torch.float32
    assert not torch.equal(low_loss, loss)  # the products did run in bf16
    torch.testing.assert_close(low_loss, loss, rtol=2e-2, atol=0)
    torch.testing.assert_close(low_hidden, grad_hidden, rtol=0, atol=5e-2 * grad_hidden.abs().max().item())
    for name in grads:
        assert low_grads[name].dtype == torch.float32
        torch.testing.assert_close(low_grads[name], grads[name], rtol=0, atol=5e-2 * grads[name].abs().max().item())


@pytest.mark.parametrize("batched", [False, True])
def test_sparse_word_rows_only_when_the_step_touches_few(batched):
    """Below SPARSE_ROWS_BELOW of the vocabulary the word rows' gradient is sparse, above it dense."""
    layer = make("class C=7").float()
    layer.batched_products, layer.sparse_rows = batched, True
    widths = layer.class_start.diff()
    narrow = int(torch.nonzero((widths > 1) & (widths < output_layers.SPARSE_ROWS_BELOW * V))[0])
    hidden = torch.randn(V, H)
    for target, sparse in ((layer.class_start[narrow].repeat(V), True), (torch.arange(V), False)):
        layer.zero_grad(set_to_none=True)
        layer(hidden, target).sum().backward()
        assert layer.word_decoder.weight.grad.is_sparse == layer.word_decoder.bias.grad.is_sparse == sparse


@pytest.mark.parametrize(("name", "sparse_rows"), [(name, False) for name in LAYERS]
                         + [(name, True) for name, (kind, _) in LAYERS.items() if kind == "class"])
def test_bf16_autocast_on_cpu_trains_like_fp32(name, sparse_rows):
    """precision=bf16-mixed on CPU: each output layer's forward and backward under bf16 autocast give a finite
    loss within bf16 rounding of fp32's (8 bits of mantissa: 2^-8 = 0.4% a product) and finite gradients,
    the class layer with sparse word rows (SGD) and dense ones."""
    hidden, target = inputs(64)
    losses, grads = {}, {}
    for precision in ("fp32", "bf16"):
        layer = make(name).float()
        if sparse_rows:
            layer.sparse_rows = True
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = layer(hidden.float(), target).mean()
        loss.backward()
        losses[precision] = float(loss)
        grads[precision] = [p.grad.to_dense() for p in layer.parameters() if p.grad is not None and p.numel()]
    assert np.isfinite(losses["bf16"]) and losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)
    assert len(grads["bf16"]) == len(grads["fp32"]) > 0
    for bf16, fp32 in zip(grads["bf16"], grads["fp32"]):
        assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
        torch.testing.assert_close(bf16, fp32, rtol=0, atol=5e-2 * float(fp32.abs().max()))
