import math

import numpy as np
import optuna
import pytest

from bench.config import make_config
from bench.errors import BenchError
from bench.harness import PROC_CLEAR_REFS, peak_memory_mb, run_experiment
from bench.interpolation import mixture_perplexity, tune_interpolation
from bench.models.kneser_ney import KneserNey
from bench.models.plugins import model_names, model_spec
from bench.redact import redact
from bench.store import open_storage, save_record

TINY = {"corpus": "ptb", "max_epochs": 2, "hidden_size": 8}


def test_same_config_and_seed_give_the_same_perplexity(tiny_ptb):
    config = make_config("rnn-bptt", TINY)
    first, second = (run_experiment(config, data_dir=tiny_ptb, progress=False) for _ in range(2))
    assert first["test_ppl"] == pytest.approx(second["test_ppl"], rel=1e-6)
    assert first["valid_ppl"] == pytest.approx(second["valid_ppl"], rel=1e-6)
    other_seed = run_experiment(make_config("rnn-bptt", {**TINY, "seed": 1}), data_dir=tiny_ptb, progress=False)
    assert other_seed["test_ppl"] != pytest.approx(first["test_ppl"], rel=1e-6)


def test_record_holds_perplexities_speed_and_provenance(tiny_ptb):
    record = run_experiment(make_config("gru", {**TINY, "kn_order": 3}), data_dir=tiny_ptb, progress=False)
    assert record["epochs"] == len(record["valid_ppl_per_epoch"]) == 2
    assert record["valid_ppl"] == min(record["valid_ppl_per_epoch"])
    assert record["tokens_per_second"] > 0 and record["minutes_per_epoch"] > 0 and record["test_seconds"] > 0
    assert record["parameters"] > 0 and record["peak_memory_mb"] > 0
    assert record["config"]["hidden_size"] == 8 and record["versions"]["torch"]
    assert 0 <= record["kn_lambda"] <= 1
    assert record["nn_kn_valid_ppl"] <= record["valid_ppl"] * (1 + 1e-9)  # lambda = 1 is the NN alone


@pytest.mark.skipif(not PROC_CLEAR_REFS.exists(), reason="peak memory resets need Linux's /proc/self/clear_refs")
def test_peak_memory_is_the_runs_own_not_the_processes(tiny_ptb):
    big = np.ones(2**27)  # 1 GiB touched, then handed back: the process's peak, not the run's
    before = peak_memory_mb("cpu")
    del big
    record = run_experiment(make_config("rnn-bptt", TINY), data_dir=tiny_ptb, progress=False)
    assert 0 < record["peak_memory_mb"] < before - 900


def test_kn_module_scores_like_the_estimator(tiny_ptb):
    from bench.data import load_corpus

    record = run_experiment(make_config("kn", {"corpus": "ptb", "order": 3}), data_dir=tiny_ptb, progress=False)
    corpus = load_corpus("ptb", tiny_ptb)
    estimator = KneserNey(3, len(corpus.vocab), corpus.vocab.eos).fit(corpus.splits["train"])
    expected = math.exp(-estimator.log_prob_stream(corpus.splits["test"]).mean())
    assert record["test_ppl"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("model", [name for name in model_names() if model_spec(name).task == "lm"])
def test_short_training_on_synthetic_beats_unigram(model):
    config = make_config(model, {"max_epochs": 1, "max_minutes": 2.0}, quick=True)
    record = run_experiment(config, progress=False)
    assert record["oracle_ppl"] < record["test_ppl"] < record["unigram_ppl"]


def test_interpolation_finds_the_validation_optimum():
    rng = np.random.default_rng(0)
    nn, kn = np.log(rng.uniform(0.01, 1, 500)), np.log(rng.uniform(0.01, 1, 500))
    result = tune_interpolation(valid=(nn, kn), test=(nn[:100], kn[:100]))
    grid = np.linspace(0, 1, 10001)
    best = grid[np.argmin([mixture_perplexity(lam, nn, kn) for lam in grid])]
    assert result["kn_lambda"] == pytest.approx(best, abs=2e-4)
    # the mixture of p_NN and p_KN at lambda, by hand, on the test tokens
    lam = result["kn_lambda"]
    by_hand = np.exp(-np.mean(np.log(lam * np.exp(nn[:100]) + (1 - lam) * np.exp(kn[:100]))))
    assert result["nn_kn_test_ppl"] == pytest.approx(by_hand, rel=1e-12)
    with pytest.raises(BenchError, match="different token streams on valid"):
        tune_interpolation(valid=(nn, kn[:-1]), test=(nn, kn))


def test_records_are_completed_trials_in_the_optuna_storage(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path}/r.db")
    record = {"model": "lstm", "corpus": "synthetic", "valid_ppl": 120.5, "test_ppl": 125.0,
              "tokens_per_second": 1e4, "minutes_per_epoch": 0.1, "train_ppl": float("nan"), "config": {"lr": 1.0}}
    save_record(record, storage, "run-synthetic")
    save_record({**record, "valid_ppl": 110.0}, storage, "run-synthetic")
    study = optuna.load_study(study_name="run-synthetic", storage=storage)
    frame = study.trials_dataframe()
    assert frame["state"].tolist() == ["COMPLETE", "COMPLETE"]
    assert frame["value"].tolist() == [120.5, 110.0]
    assert frame["user_attrs_test_ppl"].tolist() == [125.0, 125.0]
    assert study.best_trial.user_attrs["record"]["train_ppl"] is None  # NaN stored as null
    assert redact("postgresql://bench:s3cret@db:5432/r") == "postgresql://bench:***@db:5432/r"


def test_training_stops_after_the_halved_learning_rate_fails_to_improve_too(tiny_ptb):
    config = make_config("ffnn", {"corpus": "ptb", "max_epochs": 12, "hidden_size": 8, "lr": 1.0, "schedule": "plateau",
                                  "patience": 1})
    curve = run_experiment(config, data_dir=tiny_ptb, progress=False)["valid_ppl_per_epoch"]
    best = int(np.argmin(curve))
    # one epoch without improvement halves the rate; `patience` (1) more without improvement stops training
    assert len(curve) == best + 3 < 12
    assert min(curve[best + 1:]) > curve[best]
