"""Trainer settings (accelerator, devices, num_nodes, strategy, precision), a run on several processes (DDP)
and the run folder: what runs where, in what precision, and which process writes."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from bench.cli import main
from bench.config import make_config
from bench.data import LanguageModelData
from bench.errors import BenchError
from bench.harness import build, cached_corpus, run_experiment, trainer_settings

TINY = {"corpus": "ptb", "max_epochs": 2, "hidden_size": 8}
ROOT = Path(__file__).resolve().parents[1]


def one_stream_perplexities(config: dict, data_dir, checkpoint: Path) -> tuple[float, float]:
    """Valid and test perplexity of a checkpoint's weights scored in one process, one stream, fp32."""
    model, _ = build(config, data_dir)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    data = LanguageModelData(cached_corpus(config["corpus"], data_dir), config["batch_size"], config["bptt"])
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.validate(model, data, verbose=False)
    trainer.test(model, data, verbose=False)
    return model.perplexities["val"][-1], model.perplexities["test"][-1]


def test_trainer_settings_at_their_defaults_stay_out_of_the_configuration():
    """A run on one device in fp32 keeps the configuration (and run folder) it had before the settings."""
    plain = make_config("lstm", {})
    assert make_config("lstm", {"accelerator": "auto", "devices": 1, "num_nodes": 1, "strategy": "auto",
                                "precision": 32}) == plain
    assert trainer_settings(plain) == {"accelerator": "auto", "devices": 1, "num_nodes": 1, "strategy": "auto",
                                       "precision": "32"}
    config = make_config("lstm", {"accelerator": "cpu", "devices": 4, "strategy": "ddp", "precision": "bf16-mixed"})
    assert {k: config[k] for k in ("accelerator", "devices", "strategy", "precision")} == {
        "accelerator": "cpu", "devices": 4, "strategy": "ddp", "precision": "bf16-mixed"}
    with pytest.raises(BenchError, match="batch_size 20 does not split into 8 equal shares"):
        make_config("lstm", {"devices": 4, "num_nodes": 2})


def test_the_n_gram_model_counts_on_the_cpu():
    assert trainer_settings(make_config("kn", {}))["accelerator"] == "cpu"



@pytest.mark.parametrize("model", ["rnn-bptt", "lstm"])
def test_mixed_precision_trains_in_bf16_and_scores_the_exact_fp32_figures(tiny_ptb, tmp_path, model):
    """precision=bf16-mixed on the CPU: trained under bf16 autocast, the best weights scored in fp32, so the
    record's perplexities are the one-stream fp32 scores of those weights; the record names the precision."""
    config = make_config(model, {**TINY, "precision": "bf16-mixed", "eval_batch_size": 4})
    record = run_experiment(config, data_dir=tiny_ptb, progress=False, run_dir=tmp_path / "run")
    assert (record["precision"], record["devices"], record["device"]) == ("bf16-mixed", 1, "cpu")
    assert record["matmul_precision"] == "highest"  # TF32 is for CUDA devices only
    valid, test = one_stream_perplexities(config, tiny_ptb, tmp_path / "run" / "best.ckpt")
    assert record["valid_ppl"] == pytest.approx(valid, rel=1e-6)
    assert record["test_ppl"] == pytest.approx(test, rel=1e-6)
    fp32 = run_experiment(make_config(model, {**TINY, "eval_batch_size": 4}), data_dir=tiny_ptb, progress=False)
    assert fp32["precision"] == "32-true" and record["test_ppl"] != fp32["test_ppl"]
    assert record["test_ppl"] == pytest.approx(fp32["test_ppl"], rel=0.05)  # 2 epochs in bf16: close


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_missing_device_is_a_user_error_before_anything_is_written(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path}/results.db"
    assert main(["train", "rnn-bptt", "--set", "accelerator=gpu", "--storage", storage,
                 "--run-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "bench: error: accelerator=gpu, devices=1: No supported gpu backend found!"
    assert not (tmp_path / "results.db").exists() and not (tmp_path / "runs").exists()

