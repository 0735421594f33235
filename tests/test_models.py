import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from bench.config import make_config, model_arguments
from bench.data import Corpus, LanguageModelData, Vocabulary, load_corpus
from bench.models import REGISTRY, base, output_layers
from bench.models.elman import ElmanLM
from bench.models.plugins import model_names, model_spec

# every language model, the built-in ones and the installed plugins (the suite's own transformer)
LANGUAGE_MODELS = [name for name in model_names() if model_spec(name).task == "lm"]
VOCAB = Vocabulary(words=["<eos>", *"abcdefg"], counts=np.array([50, 30, 20, 10, 5, 3, 2, 1]))


def build(name: str, **overrides):
    sizes = {"hidden_size": 16} if model_spec(name).neural else {}
    config = make_config(name, {**sizes, **overrides})
    return model_spec(name).module(VOCAB, **model_arguments(config))


@pytest.mark.parametrize("backprop,bptt,reaches", [("bp", 5, False), ("bptt", 3, True), ("bptt", 5, True)])
def test_gradient_reaches_two_steps_back_only_with_bptt(backprop, bptt, reaches):
    torch.manual_seed(0)
    model = ElmanLM(VOCAB, backprop=backprop, hidden_size=8)
    inputs = torch.randint(0, len(VOCAB), (2, bptt))
    ux = model.input(inputs).detach().requires_grad_(True)
    hidden, _ = model.recur(ux, model.init_state(2))
    t = bptt - 1
    loss = model.output(hidden[:, t], torch.tensor([1, 2])).sum()
    (grad,) = torch.autograd.grad(loss, ux)
    assert torch.count_nonzero(grad[:, t]) > 0  # the step's own input always gets the error
    assert (torch.count_nonzero(grad[:, t - 2]) > 0) == reaches
    if not reaches:
        assert torch.equal(grad[:, : t], torch.zeros_like(grad[:, : t]))  # exactly zero, not just small


def test_bp_and_bptt_compute_the_same_forward_values():
    torch.manual_seed(0)
    bp = ElmanLM(VOCAB, backprop="bp", hidden_size=8)
    bptt = ElmanLM(VOCAB, backprop="bptt", hidden_size=8)
    bptt.load_state_dict(bp.state_dict())
    inputs = torch.randint(0, len(VOCAB), (3, 6))
    h_bp, s_bp = bp(inputs, bp.init_state(3))
    h_bptt, s_bptt = bptt(inputs, bptt.init_state(3))
    torch.testing.assert_close(h_bp, h_bptt)
    torch.testing.assert_close(s_bp, s_bptt)


@pytest.mark.parametrize("bptt,context", [(5, 3), (3, 5), (4, 4)])
def test_bptt_context_runs_the_gradient_through_the_steps_before_the_chunk(bptt, context):
    """Chunk 2's loss, with bptt_context K, equals the loss of one unrolled stream whose gradient is cut K steps
    before chunk 2, in value and in every gradient; chunk 1 starts from the empty state."""
    torch.manual_seed(0)
    model = ElmanLM(VOCAB, backprop="bptt", hidden_size=8, bptt_context=context).double()
    words = torch.randint(0, len(VOCAB), (2, 2 * bptt + 1))
    inputs, targets = words[:, :-1], words[:, 1:]
    state = model.init_state(2)
    for chunk in range(2):
        hidden, state = model(inputs[:, chunk * bptt:(chunk + 1) * bptt], base.detach(state))
    loss = model.output(hidden.reshape(-1, 8), targets[:, bptt:].reshape(-1)).sum()
    grads = torch.autograd.grad(loss, list(model.parameters()))

    cut = max(bptt - context, 0)  # the gradient stops at the state after the first `cut` words
    ux, h = model.input(inputs), torch.zeros(2, 8, dtype=torch.float64)
    if cut:
        with torch.no_grad():
            _, h = model._unroll(ux[:, :cut], h)
    states, _ = model._unroll(ux[:, cut:], h)
    expected = model.output(states[:, -bptt:].reshape(-1, 8), targets[:, bptt:].reshape(-1)).sum()
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    for got, want in zip(grads, torch.autograd.grad(expected, list(model.parameters()))):
        torch.testing.assert_close(got.to_dense() if got.is_sparse else got,
                                   want.to_dense() if want.is_sparse else want, rtol=0, atol=1e-12)
    assert isinstance(model.eval().init_state(2), torch.Tensor)  # scoring carries the plain hidden state


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
@pytest.mark.parametrize("backprop", ["bp", "bptt"])
def test_elman_scoring_recurrence_equals_the_training_loop(backprop, activation):
    torch.manual_seed(0)
    model = ElmanLM(VOCAB, backprop=backprop, hidden_size=16, activation=activation).double()
    inputs = torch.randint(0, len(VOCAB), (3, 40))
    state = torch.rand(3, 16, dtype=torch.float64)
    trained, trained_last = model(inputs, state)
    model.eval()  # scoring: torch's fused RNN loop (sigmoid through tanh)
    scored, scored_last = model(inputs, state)
    torch.testing.assert_close(scored, trained, rtol=0, atol=1e-12)
    torch.testing.assert_close(scored_last, trained_last, rtol=0, atol=1e-12)
    assert torch.equal(scored[:, -1], scored_last)


@pytest.mark.parametrize("name", LANGUAGE_MODELS)
def test_chunked_scoring_with_carried_state_equals_scoring_the_whole_stream(name):
    torch.manual_seed(0)
    model = build(name).eval()
    if name == "kn":  # counting is the n-gram model's training
        model.estimator.fit(np.random.default_rng(0).integers(0, len(VOCAB), 300))
    inputs = torch.randint(0, len(VOCAB), (2, 12))
    targets = torch.randint(0, len(VOCAB), (2, 12))
    whole, _ = model.nll(inputs, targets, model.init_state(2))
    state, parts = model.init_state(2), []
    for start in range(0, 12, 5):
        nll, state = model.nll(inputs[:, start:start + 5], targets[:, start:start + 5], state)
        parts.append(nll)
    torch.testing.assert_close(torch.cat(parts, dim=1), whole)


@pytest.mark.parametrize("name", ["ffnn", "rnn-bptt", "lstm"])
@pytest.mark.parametrize("over_limit", [True, False])
def test_gradient_clipping_equals_torchs_on_the_dense_gradients(name, over_limit):
    """Clipping with the sparse embedding rows gives torch's clip_grad_norm_ of the same gradients made
    dense, the limit crossed (every gradient scaled) or not (every gradient untouched)."""
    torch.manual_seed(0)
    model = build(name, optimizer="sgd", l2=0.0)  # SGD: sparse embedding gradients (ffnn's default is Adam)
    inputs, targets = torch.randint(0, len(VOCAB), (2, 5)), torch.randint(0, len(VOCAB), (2, 5))
    nll, _ = model.nll(inputs, targets, model.init_state(2))
    (nll.sum() * 10).backward()
    assert any(p.grad.is_sparse for p in model.parameters())  # SGD: the embedding's rows only
    dense = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    for d, p in zip(dense, model.parameters()):
        d.grad = p.grad.to_dense().clone()
    total = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d.grad) for d in dense])))
    limit = 0.5 if over_limit else 2 * total
    assert float(torch.nn.utils.clip_grad_norm_(dense, limit)) == pytest.approx(total, rel=1e-6)
    model.configure_gradient_clipping(None, gradient_clip_val=limit)
    for p, d in zip(model.parameters(), dense):
        torch.testing.assert_close(p.grad.to_dense(), d.grad, rtol=1e-6, atol=1e-7)
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.to_dense())
                                                       for p in model.parameters()])))
    assert norm == pytest.approx(0.5 if over_limit else total, rel=1e-5)


def score_in_streams(model, streams: int) -> float:
    """Test perplexity of `model` on 301 random tokens of VOCAB, scored in `streams` parallel streams."""
    ids = np.random.default_rng(3).integers(0, len(VOCAB), 301)
    corpus = Corpus("random", VOCAB, {"train": ids, "valid": ids, "test": ids})
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    data = LanguageModelData(corpus, batch_size=2, bptt=3, eval_batch_size=streams, eval_tokens=7 * streams)
    return trainer.test(model, data, verbose=False)[0]["test_ppl"]


@pytest.mark.parametrize("name", LANGUAGE_MODELS)
def test_scoring_in_parallel_streams_equals_one_stream(name, monkeypatch):
    torch.manual_seed(0)
    model = build(name, **({"layers": 2} if name in ("gru", "lstm") else {}))
    if name == "kn":
        model.estimator.fit(np.random.default_rng(0).integers(0, len(VOCAB), 300))
    one_stream = score_in_streams(model, 1)
    for streams in (4, 13):
        assert score_in_streams(model, streams) == pytest.approx(one_stream, rel=1e-6, abs=0)
    monkeypatch.setattr(base, "STATE_TOLERANCE", -1.0)  # states never agree: every stream re-scored whole
    assert score_in_streams(model, 13) == pytest.approx(one_stream, rel=1e-6, abs=0)
    monkeypatch.setattr(model, "_join_streams", lambda stage: None)  # the test can tell the difference
    assert score_in_streams(model, 13) != pytest.approx(one_stream, rel=1e-4, abs=0)


def test_test_perplexity_is_exp_mean_nll_of_every_token(tiny_ptb):
    corpus = load_corpus("ptb", tiny_ptb)
    torch.manual_seed(0)
    model = REGISTRY["lstm"].module(corpus.vocab, cell="lstm", hidden_size=8, embedding_size=8, layers=1)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    result = trainer.test(model, LanguageModelData(corpus, batch_size=2, bptt=3, eval_tokens=4), verbose=False)
    # By hand: one stream, the whole test split at once, first input the leading <eos>.
    ids = torch.from_numpy(corpus.splits["test"])
    inputs = torch.cat([torch.tensor([corpus.vocab.eos]), ids[:-1]]).unsqueeze(0)
    with torch.no_grad():
        hidden, _ = model(inputs, model.init_state(1))
        log_p = model.output.log_probs(hidden[0]).double()
    expected = torch.exp(-log_p[torch.arange(len(ids)), ids].mean()).item()
    assert result[0]["test_ppl"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", model_names())
def test_each_module_logs_the_metric_its_task_is_selected_on(name):
    spec = model_spec(name)
    assert spec.module.MONITOR == spec.monitor and spec.metric.endswith(spec.monitor.removeprefix("val_"))
    assert spec.module.MODE == {"minimize": "min", "maximize": "max"}[spec.direction]


SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


def sgd_step(model: ElmanLM, optimizer, batch, clip: float) -> torch.Tensor:
    """One training step as Lightning runs it: the host-side batch hook, training_step, backward, clipping,
    SGD step."""
    batch = model.transfer_batch_to_device(model.on_before_batch_transfer(batch, 0), torch.device("cpu"), 0)
    loss = model.training_step(batch, 0)
    loss.backward()
    model.configure_gradient_clipping(optimizer, clip)
    optimizer.step()
    optimizer.zero_grad()
    return loss


def class_lm(output: str = "class", **options) -> ElmanLM:
    """An RNN over 40 words, with 6 classes, SGD and bptt_context 2 unless `options` say otherwise."""
    vocab = Vocabulary(words=["<eos>", *(f"w{i}" for i in range(39))], counts=np.arange(40, 0, -1) ** 2)
    torch.manual_seed(0)
    options = {"optimizer": "sgd", "lr": 0.5, **({"classes": 6} if output == "class" else {}), **options}
    return ElmanLM(vocab, hidden_size=8, bptt_context=2, output=output, **options)


def stream_batch(seed: int, streams: int = 3, steps: int = 4):
    words = torch.randint(0, 40, (streams, steps + 1), generator=torch.Generator().manual_seed(seed))
    return words[:, :-1], words[:, 1:], torch.ones(streams, steps, dtype=torch.bool)


def test_the_batch_transfer_moves_every_tensor_of_the_plan():
    """transfer_batch_to_device moves the inputs, targets, mask and every tensor of the class plan, keeps
    the plan's per-class tuples, and passes a missing plan (no target in a class of several words) on."""
    model = class_lm()
    batch = model.on_before_batch_transfer(stream_batch(0), 0)
    moved = model.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert [t.device.type for t in moved[:3]] == ["meta"] * 3 and type(moved[3]) is type(batch[3])
    for name, original in batch[3]._asdict().items():
        value = getattr(moved[3], name)
        if isinstance(original, torch.Tensor):
            assert value.device.type == "meta" and value.shape == original.shape
        else:
            assert value == original and len(value) > 1  # the classes present
    assert model.transfer_batch_to_device((*batch[:3], None), torch.device("meta"), 0)[3] is None


@pytest.mark.parametrize("clip", [0.05, 100.0])  # clipping on (the norm is above 0.05) and off
def test_sparse_sgd_step_equals_the_dense_step(monkeypatch, clip):
    """After one SGD step (with bptt_context: the context words' embeddings too), the model with sparse
    gradients for the input embeddings and the class layer's word rows holds the dense model's weights to
    1e-6, on the rows the step touched and on the others, which did not move."""
    monkeypatch.setattr(output_layers, "SPARSE_ROWS_BELOW", 1.01)  # sparse however many rows are touched
    sparse, dense = class_lm(), class_lm()
    dense.input.sparse, dense.output.sparse_rows = False, False
    assert sparse.output.sparse_rows and sparse.input.sparse
    before = {name: p.detach().clone() for name, p in sparse.named_parameters()}
    for model in (sparse, dense):
        model._start("train")
        sgd_step(model, base.make_optimizer(model, "sgd", 0.5), stream_batch(0), clip)
    inputs, targets, _ = stream_batch(0)
    touched_classes = torch.unique(sparse.output.word_class[targets])
    word_rows = torch.isin(sparse.output.word_class, touched_classes)
    word_rows &= (sparse.output.class_start.diff() > 1)[sparse.output.word_class]
    touched = {"input.weight": torch.isin(torch.arange(40), inputs.contiguous()),
               "output.word_decoder.weight": word_rows, "output.word_decoder.bias": word_rows}
    for name, p in sparse.named_parameters():
        q = dict(dense.named_parameters())[name]
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
        if name in touched:
            rows = touched[name]
            assert 0 < rows.sum() < len(rows)
            assert torch.equal(p[~rows], before[name][~rows])  # untouched rows: exactly where they were
            assert (p[rows] != before[name][rows]).any(dim=-1 if p.dim() > 1 else 0).all()
            torch.testing.assert_close(p[rows], q[rows], rtol=0, atol=1e-6)


def test_l2_and_adam_keep_the_dense_word_rows():
    """Sparse word rows under SGD without L2 only: L2 decays every row every step, Adam moves every row."""
    for model, sparse in ((class_lm(), True), (class_lm(l2=1e-4), False), (class_lm(optimizer="adam"), False)):
        assert model.output.sparse_rows == sparse
        assert {id(p) for p in base.sparse_parameters(model)} == (
            {id(model.input.weight), id(model.output.word_decoder.weight), id(model.output.word_decoder.bias)}
            if sparse else {id(model.input.weight)} if model.hparams.optimizer == "sgd" else set())


@pytest.mark.parametrize("output", ["class", "full"])
def test_training_steps_never_ask_the_host(monkeypatch, output):
    """Five training steps (loss, backward, clipping, SGD) call none of the Tensor methods that copy to the
    host or wait for the device but one: on the CPU the clipping compares its norm, there already, with the
    limit (on a GPU it scales by a factor left on the device); the batch hook (host data, before the
    transfer) is left out. The
    epoch's perplexity then reads the sums once, and equals the mean of the five losses."""
    model = class_lm(output)
    optimizer = base.make_optimizer(model, "sgd", 0.5)
    model._start("train")
    calls = []
    batches = [model.on_before_batch_transfer(stream_batch(seed), 0) for seed in range(5)]
    batches = [(*b[:2], b[2].clone(), *b[3:]) for b in batches]
    batches[-1][2][-1, -2:] = False  # padding in the last batch, as at the end of a split
    losses = []
    with monkeypatch.context() as patch:
        for method in SYNC_METHODS:
            original = getattr(torch.Tensor, method)
            patch.setattr(torch.Tensor, method, lambda self, *a, _m=method, _f=original, **k: (calls.append(_m),
                                                                                              _f(self, *a, **k))[1])
        for i, batch in enumerate(batches):
            loss = model.training_step(batch, i)
            loss.backward()
            model.configure_gradient_clipping(optimizer, 0.1)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
    assert calls == ["__bool__"] * 5
    total, count = model._sums["train"]
    counts = torch.tensor([b[2].sum() for b in batches])
    assert int(count) == int(counts.sum()) == 5 * 12 - 2
    assert float(total) == pytest.approx(float((torch.stack(losses).double() * counts).sum()), rel=1e-6)


def test_training_flops_per_token_count_each_product_three_times():
    """Forward (2 FLOPs a multiply-add) and a backward of twice the forward, hand-counted for 16 hidden units
    and the 8-word vocabulary: the recurrence W h (16 x 16; U x is a lookup), then the output layer."""
    hidden, vocab = 16, len(VOCAB)
    assert build("rnn-bptt", output="full").training_flops_per_token() == 3 * (2 * hidden * hidden + 2 * hidden * vocab)
    classes = build("rnn-bptt", output="class", classes=2).output
    expected = 3 * (2 * hidden * hidden + 2 * hidden * (2 + classes.mean_class_size))
    assert build("rnn-bptt", output="class", classes=2).training_flops_per_token() == pytest.approx(expected)
