"""The kill soak: a sweep SIGKILLed at seeded random moments -- while it writes checkpoints, run files and
the journal, or at a random time -- and re-run after each kill, ends with the records of the same sweep
never killed: every trial complete exactly once, no trial duplicated, no failed run, no study unreadable, no
run folder stuck (tests/kill_bench.py does the killing).
"""

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from test_resume import assert_same_run

from bench.cli import main
from bench.store import open_storage

ROOT = Path(__file__).resolve().parents[1]
SPEC = """
study: soak
model: rnn-bptt
corpus: synthetic
fixed: {{hidden_size: 8, batch_size: 32, bptt: 10, eval_batch_size: 64, limit_train_batches: 20}}
grid: {{lr: {rates}}}
budget: {{epochs: {epochs}}}
max_retry: 100
"""
# (kind, the most flushes of that kind a kill waits for): small, so that 20 kills come before the sweep ends;
# "time": seconds after the command opened the study
KILLS = {"checkpoint": 2, "record": 1, "folder": 3, "journal": 6, "time": 1.5}


def write_spec(folder: Path, rates: list[float], epochs: int) -> Path:
    path = folder / "soak.yaml"
    path.write_text(SPEC.format(rates=rates, epochs=epochs))
    return path


def sweep_arguments(spec: Path, storage: str, runs: Path) -> list[str]:
    return ["sweep", str(spec), "--storage", storage, "--no-wandb", "--no-progress", "--run-dir", str(runs)]


def run_killed(arguments: list[str], kind: str, moment: float, cwd: Path) -> tuple[int, str]:
    """Run `bench` under tests/kill_bench.py, killed at `moment` (a flush count, or seconds for "time")."""
    process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "kill_bench.py"),
                                "none" if kind == "time" else kind, str(int(moment)), *arguments],
                               cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"})
    lines = []
    if kind == "time":
        opened = threading.Event()

        def read() -> None:
            for line in process.stdout:
                lines.append(line)
                if line.startswith("study "):
                    opened.set()

        reader = threading.Thread(target=read)
        reader.start()
        while not opened.wait(0.05) and process.poll() is None:
            pass
        time.sleep(moment)
        process.send_signal(signal.SIGKILL)
        process.wait(300)
        reader.join()
    else:
        lines = process.communicate(timeout=300)[0].splitlines(keepends=True)
    return process.returncode, "".join(lines)


def soak(folder: Path, storage: str, spec: Path, kills: int, seed: int, kinds: list[str]) -> int:
    """Kill the sweep `kills` times at moments drawn from `seed`, re-running it after each, then run it to
    its end; returns the kills survived (the sweep may end before the last ones)."""
    draw, survived = random.Random(seed), 0
    arguments = sweep_arguments(spec, storage, folder / "runs")
    while survived < kills:
        kind = draw.choice(kinds)
        moment = draw.uniform(0, KILLS[kind]) if kind == "time" else draw.randint(1, KILLS[kind])
        code, output = run_killed(arguments, kind, moment, folder)
        if code == 0:
            break  # the sweep ended before this kill's moment
        assert code == -signal.SIGKILL, f"{kind} {moment}: exit {code}\n{output}"
        survived += 1
        print(f"kill {survived}: {kind} {moment:.3g}", flush=True)
    code, output = run_killed(arguments, "none", 0, folder)
    assert code == 0 and "Traceback" not in output, output
    return survived


def assert_same_sweep(storage: str, reference: str, runs: Path) -> None:
    """Every grid point complete exactly once with the unkilled sweep's record; the killed trials failed
    without a reason of their own (their copies ran them); nothing left running or queued."""
    trials = optuna.load_study(study_name="soak", storage=open_storage(storage)).trials
    expected = {t.params["lr"]: t.user_attrs["record"]
                for t in optuna.load_study(study_name="soak", storage=open_storage(reference)).trials}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["lr"] for t in complete) == sorted(expected)
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in trials)
    assert not [t.user_attrs["fail_reason"] for t in trials if "fail_reason" in t.user_attrs]
    for trial in complete:
        record, whole = trial.user_attrs["record"], expected[trial.params["lr"]]
        assert record["test_ppl"] == pytest.approx(whole["test_ppl"], rel=1e-6)
        assert_same_run(record, whole)
    assert not list(runs.rglob("*.tmp"))  # no temporary file of a killed writer left behind
    assert sorted(path.name for path in runs.rglob("record.json")) == ["record.json"] * len(complete)


def test_a_sweep_killed_at_checkpoint_and_run_file_writes_ends_with_the_unkilled_records(tmp_path):
    """The short soak of the default run: 2 trials x 2 epochs, journal storage, 3 kills (no kill inside a
    journal append: Optuna's journal lock left by one holds the next command 30 s)."""
    spec = write_spec(tmp_path, [1.0, 3.0], 2)
    reference = f"journal:{tmp_path}/reference.log"
    assert main(sweep_arguments(spec, reference, tmp_path / "reference-runs")) == 0
    storage = f"journal:{tmp_path}/journal.log"
    assert soak(tmp_path, storage, spec, 3, seed=0, kinds=["checkpoint", "record", "folder"]) == 3
    assert_same_sweep(storage, reference, tmp_path / "runs")


@pytest.mark.slow
def test_a_sweep_killed_20_times_at_random_moments_ends_with_the_unkilled_records(tmp_path):
    """6 trials x 3 epochs, on the journal and on SQLite, 20 seeded kills each (SQLite's own writes are hit
    by the timed kills only: they do not go through Python's os.fsync)."""
    spec = write_spec(tmp_path, [0.5, 1.0, 1.5, 2.0, 2.5, 3.0], 3)
    reference = f"sqlite:///{tmp_path}/reference.db"
    assert main(sweep_arguments(spec, reference, tmp_path / "reference-runs")) == 0
    for storage, kinds in ((f"journal:{tmp_path}/journal/journal.log", list(KILLS)),
                           (f"sqlite:///{tmp_path}/sqlite/results.db", [k for k in KILLS if k != "journal"])):
        folder = tmp_path / storage.split(":")[0]
        folder.mkdir()
        started = time.monotonic()
        survived = soak(folder, storage, spec, 20, seed=20, kinds=kinds)
        print(f"{storage}: {survived} kills survived in {time.monotonic() - started:.0f} s")
        assert survived == 20
        assert_same_sweep(storage, reference, folder / "runs")
        assert main(["report", "--storage", storage, "--no-wandb", "--out", str(folder / "report")]) == 0
