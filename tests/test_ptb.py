"""Real-corpus runs through the whole harness (slow: `pytest -m slow`)."""


import optuna
import pytest

from bench.cli import main
from bench.corpora import resolve_data_dir

pytestmark = pytest.mark.slow


@pytest.fixture
def ptb_storage(tmp_path):
    if not (resolve_data_dir() / "ptb" / "ptb.train.txt").is_file():
        pytest.skip(f"PTB files not found under {resolve_data_dir()}")
    return f"sqlite:///{tmp_path}/bench.db"


def stored_record(storage: str, study: str) -> dict:
    return optuna.load_study(study_name=study, storage=storage).trials[-1].user_attrs["record"]


def test_bench_train_kn_on_ptb_matches_kenlm(ptb_storage):
    assert main(["train", "kn", "--corpus", "ptb", "--storage", ptb_storage, "--no-progress"]) == 0
    record = stored_record(ptb_storage, "train-kn-ptb")
    assert record["test_ppl"] == pytest.approx(141.19, rel=3e-3)
    assert record["valid_ppl"] == pytest.approx(148.01, rel=3e-3)


def test_bench_train_rnn_bptt_one_epoch_on_ptb(ptb_storage):
    argv = ["train", "rnn-bptt", "--corpus", "ptb", "--set", "max_epochs=1", "--storage", ptb_storage]
    assert main([*argv, "--no-progress"]) == 0
    record = stored_record(ptb_storage, "train-rnn-bptt-ptb")
    assert record["epochs"] == 1 and record["test_ppl"] < record["unigram_ppl"]
