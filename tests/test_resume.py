"""Runs that survive interruption (run folders, --resume, sweeps re-run) and the papers' schedules."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from bench.config import make_config
from bench.errors import BenchError
from bench.harness import DurableCheckpointIO, build_trainer, run_experiment
from bench.schedules import RnnlmSchedule, lr_scheduler

TINY = {"corpus": "ptb", "max_epochs": 4, "hidden_size": 8}
# rnn-bptt settings whose epoch 2 is worse than epoch 1 on the tiny corpus, so that the schedule restores weights
WORSE_EPOCH_2 = {"schedule": "rnnlm", "lr": 30.0, "bptt_context": 0, "batch_size": 32, "bptt": 5, "init_range": 0.0,
                 "l2": 0.0, "clip": 5.0, "min_improvement": 1.003}
SAME_FIGURES = ("test_ppl", "valid_ppl", "train_ppl", "valid_ppl_per_epoch", "epochs")  # equal to rel 1e-9
SAME_FACTS = ("stopped_by",)  # equal


def assert_same_run(resumed: dict, whole: dict) -> None:
    """The record of a resumed run is the uninterrupted run's: its figures to rounding, its facts exactly."""
    for key in SAME_FIGURES:
        assert resumed[key] == pytest.approx(whole[key], rel=1e-9), key
    for key in SAME_FACTS:
        assert resumed[key] == whole[key], key


class Killed(Exception):
    pass


class Crash(pl.Callback):
    """Ends the run after `epochs` epochs, checkpoints written, as a kill would (Lightning turns a
    KeyboardInterrupt into an exit, so another exception)."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epochs:
            raise Killed


@pytest.mark.parametrize("model, settings", [
    ("rnn-bptt", WORSE_EPOCH_2),  # a worse epoch 2 to undo (below)
    ("lstm", {"dropout": 0.3, "decay_after": 2}),  # dropout: the random generators must resume too
])
def test_a_resumed_run_ends_with_the_record_of_an_uninterrupted_one(tiny_ptb, model, settings):
    config = make_config(model, {**TINY, **settings})
    whole = run_experiment(config, data_dir=tiny_ptb, progress=False, run_dir=tiny_ptb / "whole")
    with pytest.raises(Killed):
        run_experiment(config, data_dir=tiny_ptb, progress=False, run_dir=tiny_ptb / "cut", callbacks=(Crash(2),))
    # every epoch is checkpointed, the ones that did not improve too (rnn-bptt's epoch 2 here got worse)
    assert torch.load(tiny_ptb / "cut" / "last.ckpt", weights_only=True)["epoch"] == 1
    resumed = run_experiment(config, data_dir=tiny_ptb, progress=False, run_dir=tiny_ptb / "cut", resume=True)
    assert whole["test_ppl"] == pytest.approx(resumed["test_ppl"], rel=1e-6)
    assert_same_run(resumed, whole)
    assert (whole["resumed"], resumed["resumed"]) == (0, 1)
    assert (whole["resume_found_no_checkpoint"], resumed["resume_found_no_checkpoint"]) == (False, False)
    if model == "rnn-bptt":
        assert whole["valid_ppl_per_epoch"][1] > whole["valid_ppl_per_epoch"][0]  # the worse epoch 2
    assert [point["epoch"] for point in resumed["curve"]] == [1, 2, 3, 4]
    times = [point["wall_minutes"] for point in resumed["curve"]]
    assert times == sorted(times)  # the clock goes on from the checkpoint, never back
    assert sorted(os.listdir(tiny_ptb / "cut")) == ["best.ckpt", "config.json", "record.json"]  # keep=best
    assert json.loads((tiny_ptb / "cut" / "record.json").read_text())["test_ppl"] == resumed["test_ppl"]


def test_checkpoints_are_flushed_to_disk_before_and_after_their_rename(tmp_path, monkeypatch):
    flushed, flush = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (flushed.append(os.readlink(f"/proc/self/fd/{fd}")), flush(fd)))
    trainer = build_trainer(make_config("rnn-bptt", TINY), [])
    assert isinstance(trainer.strategy.checkpoint_io, DurableCheckpointIO)  # the Trainer's plugin
    trainer.strategy.checkpoint_io.save_checkpoint({"x": torch.ones(3)}, tmp_path / "last.ckpt")
    assert flushed == [str(tmp_path / f".last.ckpt.{os.getpid()}.tmp"), str(tmp_path)]  # the data, then the rename
    assert os.listdir(tmp_path) == ["last.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["x"].tolist() == [1.0, 1.0, 1.0]


def test_a_checkpoint_cut_in_half_is_stepped_over_with_a_warning_and_the_run_completes(tiny_ptb, capsys):
    """last.ckpt cut in half (a copy of the folder cut short): the resume names it in one warning line and goes
    on from best.ckpt, epoch 1's (epoch 2 got worse), to the uninterrupted run's record."""
    config = make_config("rnn-bptt", {**TINY, **WORSE_EPOCH_2})
    whole = run_experiment(config, data_dir=tiny_ptb, progress=False, run_dir=tiny_ptb / "whole")
    folder = tiny_ptb / "cut"
    with pytest.raises(Killed):
        run_experiment(config, data_dir=tiny_ptb, progress=False, run_dir=folder, callbacks=(Crash(2),))
    last = folder / "last.ckpt"
    last.write_bytes(last.read_bytes()[:last.stat().st_size // 2])
    capsys.readouterr()
    resumed = run_experiment(config, data_dir=tiny_ptb, progress=False, run_dir=folder, resume=True)
    [warning] = capsys.readouterr().err.strip().splitlines()
    assert warning.startswith(f"bench: warning: {folder}: last.ckpt does not load (")  # torch's reason
    assert warning.endswith("; going on from best.ckpt (epoch 1)")
    assert (resumed["resumed"], resumed["recovered_from"]) == (1, [{"damaged": ["last.ckpt"],
                                                                    "checkpoint": "best.ckpt", "epoch": 1}])
    assert whole["recovered_from"] == []
    assert resumed["test_ppl"] == pytest.approx(whole["test_ppl"], rel=1e-6)
    assert_same_run(resumed, whole)
    assert [point["epoch"] for point in resumed["curve"]] == [1, 2, 3, 4]


def test_a_run_whose_checkpoints_are_all_damaged_starts_again_from_epoch_0(tiny_ptb, capsys):
    config = make_config("rnn-bptt", TINY)
    whole = run_experiment(config, data_dir=tiny_ptb, progress=False, run_dir=tiny_ptb / "whole")
    folder = tiny_ptb / "cut"
    with pytest.raises(Killed):
        run_experiment(config, data_dir=tiny_ptb, progress=False, run_dir=folder, callbacks=(Crash(2),))
    for name in ("last.ckpt", "best.ckpt"):
        (folder / name).write_bytes(random.Random(name).randbytes(4096))
    capsys.readouterr()
    resumed = run_experiment(config, data_dir=tiny_ptb, progress=False, run_dir=folder, resume=True)
    [warning] = capsys.readouterr().err.strip().splitlines()
    assert "last.ckpt does not load" in warning and "best.ckpt does not load" in warning
    assert warning.endswith("; starting again from epoch 0")
    assert (resumed["resumed"], resumed["recovered_from"]) == (0, [{"damaged": ["last.ckpt", "best.ckpt"],
                                                                    "checkpoint": None, "epoch": 0}])
    assert_same_run(resumed, whole)


def test_a_resume_that_finds_no_checkpoint_says_so_once_and_its_record_keeps_it_across_later_resumes(tiny_ptb,
                                                                                                       capsys):
    config, folder = make_config("rnn-bptt", TINY), tiny_ptb / "gone"
    with pytest.raises(Killed):  # a requeued trial whose folder was deleted, killed again after epoch 2
        run_experiment(config, data_dir=tiny_ptb, progress=False, run_dir=folder, resume=True, callbacks=(Crash(2),))
    [warning] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bench:")]
    assert warning == (f"bench: warning: {folder}: no checkpoint of this configuration to resume from; starting from "
                       "epoch 0")
    record = run_experiment(config, data_dir=tiny_ptb, progress=False, run_dir=folder, resume=True)
    assert "bench:" not in capsys.readouterr().err  # it found epoch 2's checkpoint
    assert (record["resumed"], record["resume_found_no_checkpoint"], record["epochs"]) == (1, True, 4)


def test_checkpoints_of_another_configuration_are_never_resumed(tiny_ptb):
    config = make_config("rnn-bptt", TINY)
    with pytest.raises(Killed):
        run_experiment(config, data_dir=tiny_ptb, progress=False, run_dir=tiny_ptb / "run", callbacks=(Crash(2),))
    other = make_config("rnn-bptt", {**TINY, "lr": 5.0})
    record = run_experiment(other, data_dir=tiny_ptb, progress=False, run_dir=tiny_ptb / "run", resume=True)
    assert record["resumed"] == 0 and record["epochs"] == 4 and record["resume_found_no_checkpoint"]


def schedule_after(losses: list[float], min_improvement: float = 1.003):
    """Feed RnnlmSchedule the validation cross-entropies `losses`; return its decisions after each."""
    module = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    trainer = SimpleNamespace(sanity_checking=False, should_stop=False, optimizers=[optimizer], callback_metrics={})
    schedule = RnnlmSchedule("val_ppl", min_improvement)
    schedule.on_train_start(trainer, module)
    steps = []
    for epoch, loss in enumerate(losses):
        with torch.no_grad():
            module.weight.fill_(epoch)  # the weights this epoch trained
        trainer.callback_metrics = {"val_ppl": torch.tensor(math.exp(loss), dtype=torch.float64)}
        schedule.on_validation_end(trainer, module)
        steps.append((optimizer.param_groups[0]["lr"], float(module.weight), trainer.should_stop))
    return steps


def test_rnnlm_schedule_halves_from_the_first_small_gain_and_stops_at_the_second():
    # 5.0 -> 4.5 (10% better), -> 4.49 (0.2% < 0.3%: halve from now on), -> 4.40 (2%: still halving),
    # -> 4.399 (0.02%: the second small gain, stop)
    steps = schedule_after([5.0, 4.5, 4.49, 4.40, 4.399])
    assert [lr for lr, _, _ in steps] == [1.0, 1.0, 0.5, 0.25, 0.25]
    assert [stop for _, _, stop in steps] == [False, False, False, False, True]


def test_rnnlm_schedule_restores_the_previous_weights_after_a_worse_epoch():
    steps = schedule_after([5.0, 4.0, 4.2, 3.9])
    # epoch 2 (loss 4.2) is worse than epoch 1: back to epoch 1's weights; that is also a small gain, so
    # halving starts; epoch 3 improves 7% on the worse epoch (rnnlm compares with the last epoch, as here)
    assert [weight for _, weight, _ in steps] == [0.0, 1.0, 1.0, 3.0]
    assert [lr for lr, _, _ in steps] == [1.0, 1.0, 0.5, 0.25]


def test_zaremba_schedule_keeps_the_rate_for_decay_after_epochs_then_decays_it_every_epoch():
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=20.0)
    scheduler = lr_scheduler(optimizer, "zaremba", 0.5, 4, "val_ppl", "min")["scheduler"]
    rates = []
    for _ in range(7):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == [20.0, 20.0, 20.0, 20.0, 10.0, 5.0, 2.5]


def test_schedule_options_belong_to_their_schedule():
    assert make_config("lstm")["decay"] == 0.5 and "min_improvement" not in make_config("lstm")
    assert "min_improvement" in make_config("rnn-bptt") and "patience" not in make_config("rnn-bptt")
    with pytest.raises(BenchError, match="decay applies to schedule=zaremba, not schedule=rnnlm"):
        make_config("rnn-bptt", {"decay": 0.5})
    with pytest.raises(BenchError, match="for language models"):
        make_config("birnn", {"schedule": "rnnlm"})


def test_l2_decays_the_dense_weights_only(tiny_ptb):
    from bench.harness import build

    config = make_config("rnn-bptt", {**TINY, "l2": 0.1})
    model, _ = build(config, str(tiny_ptb))
    optimizer = model.configure_optimizers()
    dense, sparse = optimizer.param_groups
    assert dense["weight_decay"] == 0.1 and sparse["weight_decay"] == 0.0
    assert sparse["params"] == [model.input.weight]


SPEC = """
study: resume-check
model: rnn-bptt
corpus: synthetic
fixed: {hidden_size: 16, limit_train_batches: 40, schedule: rnnlm, lr: 5.0}
grid: {seed: [0]}
budget: {epochs: 4}
"""


def sweep(tmp_path: Path, storage: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench.cli", "sweep", str(tmp_path / "spec.yaml"), "--storage",
                             storage, "--no-wandb", "--no-progress", "--run-dir", str(tmp_path / "runs")],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stored_record(storage: str) -> dict:
    import optuna

    study = optuna.load_study(study_name="resume-check", storage=storage)
    [trial] = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    return trial.user_attrs["record"]


def test_a_sweep_killed_after_epoch_2_of_4_goes_on_from_there_when_re_run(tmp_path):
    (tmp_path / "spec.yaml").write_text(SPEC)
    whole_storage, cut_storage = f"sqlite:///{tmp_path / 'whole.db'}", f"sqlite:///{tmp_path / 'cut.db'}"
    assert sweep(tmp_path, whole_storage).wait(timeout=300) == 0
    whole = stored_record(whole_storage)
    (tmp_path / "runs").rename(tmp_path / "runs-whole")

    worker = sweep(tmp_path, cut_storage)
    last = tmp_path / "runs" / "resume-check" / "trial-0" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and worker.poll() is None:  # SIGKILL once epoch 2's checkpoint is written
        try:
            if last.is_file() and torch.load(last, weights_only=True)["epoch"] >= 1:
                break
        except (EOFError, RuntimeError):  # a checkpoint being replaced; look again
            pass
        time.sleep(0.02)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    epochs_done = torch.load(last, weights_only=True)["epoch"] + 1
    assert epochs_done < 4, "the sweep finished before it could be killed"

    again = sweep(tmp_path, cut_storage)
    output = again.communicate(timeout=300)[0]
    assert again.returncode == 0, output
    assert "their worker is gone; failed and requeued" in output
    resumed = stored_record(cut_storage)
    assert resumed["resumed"] == 1
    assert resumed["test_ppl"] == pytest.approx(whole["test_ppl"], rel=1e-6)
    assert_same_run(resumed, whole)
