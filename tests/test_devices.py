"""Trainer settings (accelerator, devices, num_nodes, strategy, precision), a run on several processes (DDP)
and the run folder: what runs where, in what precision, and which process writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import optuna
import pytest
import torch

from bench.cli import build_parser, main
from bench.config import make_config
from bench.data import LanguageModelData, StreamChunks, batchify, process_streams
from bench.errors import BenchError
from bench.harness import build, cached_corpus, run_experiment, trainer_settings
from bench.sweep_spec import load_spec
from bench.sweeps import run_sweep

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


@pytest.mark.parametrize("rows,processes", [(8, 2), (8, 4), (6, 3), (5, 1)])
def test_each_process_reads_a_contiguous_block_of_streams_in_chunk_order(rows, processes):
    """Process r of W gets streams [r*B/W, (r+1)*B/W), every chunk of them in order: its rows read one after
    the other give back one contiguous stretch of the corpus, and the processes' stretches, by rank, the whole."""
    ids = np.arange(1, 95, dtype=np.int64)  # B streams of ceil(94 / B) steps, the last one padded
    _, full_targets, full_mask = batchify(ids, 0, rows)
    shares = [StreamChunks(ids, 0, rows, 4, rank, processes) for rank in range(processes)]
    stretches = []
    for rank, chunks in enumerate(shares):
        share = rows // processes
        assert torch.equal(chunks.targets, full_targets[rank * share:(rank + 1) * share])
        assert torch.equal(process_streams(full_mask, rank, processes), chunks.mask)
        assert len(chunks) == len(shares[0])  # every process steps through the same number of chunks
        read = torch.cat([chunks[i][1] for i in range(len(chunks))], dim=1)  # chunk after chunk
        mask = torch.cat([chunks[i][2] for i in range(len(chunks))], dim=1)
        stretches.append(read[mask])
        assert torch.equal(read[mask], torch.arange(int(read[mask][0]), int(read[mask][0]) + int(mask.sum())))
    assert torch.equal(torch.cat(stretches), torch.from_numpy(ids))


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


def test_the_run_folder_is_absolute_and_named_in_the_record(tiny_ptb, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert build_parser().parse_args(["train", "lstm"]).run_dir == tmp_path.resolve() / "runs"
    record = run_experiment(make_config("rnn-bptt", TINY), data_dir=tiny_ptb, progress=False,
                            run_dir=Path("runs/one"))
    assert record["run_dir"] == str(tmp_path.resolve() / "runs" / "one")
    assert json.loads((tmp_path / "runs" / "one" / "record.json").read_text())["run_dir"] == record["run_dir"]
    assert run_experiment(make_config("rnn-bptt", TINY), data_dir=tiny_ptb, progress=False)["run_dir"] is None


# the class layer in the default tests (its sparse word rows in one process, dense under DDP); full: slow
@pytest.mark.parametrize("output", [pytest.param({}, marks=pytest.mark.slow), {"output": "class", "classes": 10}])
def test_a_two_process_ddp_run_scores_the_exact_figures_and_stores_one_trial(tmp_path, output):
    """`bench train` on 2 CPU processes (DDP over gloo): one record and one trial; valid and test perplexity
    equal the one-process run of the same configuration (each process's streams are its own, so the run
    trains as one process on all of them; no chunk reaches the end of the split, where a share's tokens would
    differ) and the one-stream scores of its best weights; tokens per second count both processes' tokens."""
    settings = {"hidden_size": 16, "max_epochs": 2, "limit_train_batches": 30, "batch_size": 4, "bptt": 5, **output}
    storage = f"sqlite:///{tmp_path}/results.db"
    command = [sys.executable, "-m", "bench.cli", "train", "rnn-bptt", "--no-progress", "--storage", storage,
               "--keep", "all", *[f"--set={key}={value}" for key, value in settings.items()]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    ddp = subprocess.run([*command, "--set=accelerator=cpu", "--set=devices=2", "--set=strategy=ddp",
                          "--run-dir", "ddp"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count(" synthetic ") == 1  # rank 0's table only
    one = subprocess.run([*command, "--run-dir", "one"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    (ddp_file,), (one_file,) = (list(tmp_path.glob(f"{name}/*/*/record.json")) for name in ("ddp", "one"))
    ddp_record, one_record = (json.loads(path.read_text()) for path in (ddp_file, one_file))
    assert (ddp_record["devices"], one_record["devices"]) == (2, 1)
    for key in ("train_ppl", "valid_ppl", "test_ppl"):
        assert ddp_record[key] == pytest.approx(one_record[key], rel=1e-5), key
    valid, test = one_stream_perplexities(ddp_record["config"], None, ddp_file.parent / "best.ckpt")
    assert ddp_record["valid_ppl"] == pytest.approx(valid, rel=1e-6)
    assert ddp_record["test_ppl"] == pytest.approx(test, rel=1e-6)
    # both processes' tokens: 2 epochs x 30 chunks x 4 streams x 5 steps, over rank 0's training seconds
    minutes = ddp_record["minutes_per_epoch"] * ddp_record["epochs"]
    assert ddp_record["tokens_per_second"] * minutes * 60 == pytest.approx(2 * 30 * 4 * 5, rel=1e-6)
    trials = optuna.load_study(study_name="train-rnn-bptt-synthetic", storage=storage).trials
    assert len(trials) == 2  # the DDP run's (rank 0 only) and the one-process run's


def test_a_sweep_refuses_trials_on_several_devices_before_the_study(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("model: rnn-bptt\ncorpus: synthetic\nfixed: {hidden_size: 8, batch_size: 4, devices: 2}\n"
                    "budget: {epochs: 1, minutes: 0.01}\nsearch: {lr: [0.1, 1.0]}\n")
    with pytest.raises(BenchError, match="devices: a sweep's trials run on one device each"):
        run_sweep(load_spec(spec), storage_url=f"sqlite:///{tmp_path}/results.db", use_wandb=False)
    assert not (tmp_path / "results.db").exists()
