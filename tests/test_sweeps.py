"""`bench sweep`: specs, trials stored as runs, W&B runs per trial, failures, pruning, resume, shared studies.

Trials are tiny (hidden 8, one epoch cut at ~0.6 s of training, scoring 64 streams at once) so the fast
tests stay around a minute. PostgreSQL: .ci/run starts a server and exports BENCH_TEST_POSTGRES_URL.
"""

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from bench.cli import main
from bench.config import TASK_CORPORA
from bench.errors import BenchError
from bench.models.plugins import model_spec
from bench.reports import load_runs
from bench.store import SUMMARY_KEYS, open_storage, save_record
from bench.sweep_spec import load_spec
from bench.sweeps import Objective, describe, places_taken, run_sweep
from bench.tasks import LANGUAGE_MODEL, TASKS
from bench.tracking import wandb_mode

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_SPECS = sorted((ROOT / "sweeps").glob("*.yaml"))
TINY = """
model: rnn-bptt
corpus: synthetic
fixed: {hidden_size: 8, batch_size: 64, bptt: 10, eval_batch_size: 64}
budget: {epochs: 1, minutes: 0.01}
"""


def write_spec(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def wandb_records(path: Path):
    """The protobuf records of an offline W&B run file (run-ID.wandb): a LevelDB-style log of 32 KiB blocks,
    each record a 7-byte header (crc, length, type: 1 full, 2 first, 3 middle, 4 last) and its bytes."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, pending = path.read_bytes(), 32768, 7, b""  # 7: the ":W&B" file header
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def offline_runs(wandb_dir: Path) -> list[dict]:
    """Every offline W&B run under `wandb_dir`: group, job type, tags, config, final summary, exit code."""
    runs = []
    for path in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):
        run = {"summary": {}, "exit_code": None}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(group=record.run.run_group, job_type=record.run.job_type, tags=list(record.run.tags),
                           config={u.key: json.loads(u.value_json) for u in record.run.config.update})
            elif kind == "summary":
                run["summary"].update({u.key or u.nested_key[0]: json.loads(u.value_json)
                                       for u in record.summary.update if u.key or len(u.nested_key) == 1})
            elif kind == "exit":
                run["exit_code"] = record.exit.exit_code
        runs.append(run)
    return runs


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """No W&B credentials and no WANDB_MODE: the sweep must choose offline by itself; runs land in tmp_path."""
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    return tmp_path


def test_a_study_started_again_in_a_new_storage_trains_afresh_over_the_old_run_folders(tmp_path):
    """Run folders are named by study and trial number: the trials of a new study of the same name must not
    pick up the finished runs (records, checkpoints) an earlier one left there."""
    spec = write_spec(tmp_path, TINY.replace("minutes: 0.01", "minutes: 5") + "study: again\nsearch:\n"
                                "  lr: {type: log-float, low: 0.5, high: 5}\n"
                                "sampler: {type: random, seed: 1}\npruner: none\ntrials: 2\n")
    runs = tmp_path / "runs"
    records = []
    for storage in (f"sqlite:///{tmp_path}/first.db", f"sqlite:///{tmp_path}/second.db"):
        assert main(["sweep", str(spec), "--storage", storage, "--no-progress", "--no-wandb", "--run-dir",
                     str(runs)]) == 0
        study = optuna.load_study(study_name="again", storage=storage)
        records.append([t.user_attrs["record"] for t in study.trials])
    for first, second in zip(*records):
        assert second["resumed"] == 0 and len(second["curve"]) == 1  # trained from epoch 0, not resumed
        assert second["test_seconds"] != first["test_seconds"]  # measured again, not the old record
        assert second["test_ppl"] == pytest.approx(first["test_ppl"], rel=1e-6)  # same seed and settings


def test_wandb_is_offline_without_credentials_or_server_online_with_them(offline_wandb, monkeypatch):
    assert wandb_mode() == "offline"
    assert wandb_mode(use_wandb=False) == "disabled"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.invalid")  # no such host: offline at once, not after 60 s
    assert wandb_mode() == "offline"
    monkeypatch.setattr("bench.tracking.wandb_reachable", lambda url: True)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


def test_sweep_stores_every_trial_as_a_run_with_one_wandb_run_each_and_resumes(offline_wandb, capsys):
    # a budget of whole epochs: the 0.6 s one of TINY cuts the epoch short on a slow machine
    spec = write_spec(offline_wandb, TINY.replace("minutes: 0.01", "minutes: 5") + "study: tiny\nsearch:\n"
                                            "  lr: {type: log-float, low: 0.5, high: 5}\n"
                                            "sampler: {type: random, seed: 1}\npruner: none\ntrials: 3\n")
    storage = f"sqlite:///{offline_wandb}/results.db"
    assert main(["sweep", str(spec), "--storage", storage, "--no-progress"]) == 0
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    for trial in study.trials:
        record = trial.user_attrs["record"]
        assert trial.value == record["valid_ppl"] and record["config"]["lr"] == trial.params["lr"]
        assert all(trial.user_attrs[key] == record[key] for key in SUMMARY_KEYS)
        assert record["epochs"] == 1 and record["test_ppl"] > record["oracle_ppl"] and record["tokens_per_second"] > 0
    runs = load_runs(storage, ["tiny"])  # the reports read sweeps like any stored run
    assert sorted(runs["valid_ppl"]) == sorted(t.value for t in study.trials)

    wandb_runs = offline_runs(offline_wandb)
    assert len(wandb_runs) == 3 and {r["group"] for r in wandb_runs} == {"tiny"}
    assert {r["job_type"] for r in wandb_runs} == {"rnn-bptt"} and {r["exit_code"] for r in wandb_runs} == {0}
    by_trial = {r["config"]["trial"]: r for r in wandb_runs}
    for trial in study.trials:
        run = by_trial[trial.number]
        assert run["config"]["lr"] == trial.params["lr"] and run["config"]["hidden_size"] == 8
        assert run["summary"]["state"] == "complete"
        assert run["summary"]["valid_ppl"] == pytest.approx(trial.value, rel=1e-9)
        assert "val_ppl" in run["summary"]  # the epoch metric, logged through Lightning's WandbLogger
    assert "0 of 3 trials held, 3 to run; W&B offline" in capsys.readouterr().out

    # The same command again: nothing owed. --trials 4: one more, four in all.
    assert main(["sweep", str(spec), "--storage", storage, "--no-progress"]) == 0
    assert "3 of 3 trials held, 0 to run" in capsys.readouterr().out
    assert main(["sweep", str(spec), "--storage", storage, "--no-progress", "--trials", "4"]) == 0
    out = capsys.readouterr().out
    assert "3 of 4 trials held, 1 to run" in out and "trial 3 COMPLETE" in out
    assert [t.state for t in optuna.load_study(study_name="tiny", storage=storage).trials] == [TrialState.COMPLETE] * 4
    assert len(offline_runs(offline_wandb)) == 4


def test_diverging_trial_fails_with_its_reason_and_a_pruned_one_keeps_its_metrics(offline_wandb):
    """Journal storage. A run that diverges (relu, lr 1e4, no clipping: its loss or its validation perplexity
    becomes non-finite), a good one, and a hopeless one that the median pruner stops after one epoch."""
    spec = write_spec(offline_wandb, TINY + """
study: outcomes
grid:
  - {activation: [relu], lr: [10000.0], clip: [0.0]}
  - {lr: [3.0, 0.0001]}
sampler: {type: grid, seed: 3}  # the grid's order: the good run, the diverging one, the hopeless one
pruner: {type: median, n_startup_trials: 1}
""")
    storage = f"journal:{offline_wandb}/journal.log"
    table = run_sweep(load_spec(spec), storage_url=storage, progress=False)
    trials = {t.params["configuration"]: t for t in optuna.load_study(study_name="outcomes",
                                                                       storage=open_storage(storage)).trials}
    failed, good, bad = trials["activation=relu lr=10000.0 clip=0.0"], trials["lr=3.0"], trials["lr=0.0001"]
    assert failed.state == TrialState.FAIL and good.state == TrialState.COMPLETE
    assert failed.user_attrs["fail_reason"].startswith("FloatingPointError: ")
    assert "became" in failed.user_attrs["fail_reason"] and "record" not in failed.user_attrs
    assert good.user_attrs["record"]["config"]["lr"] == 3.0
    assert (good.number, failed.number, bad.number) == (0, 1, 2)  # the study went on after the failure
    assert bad.state == TrialState.PRUNED  # judged against the good trial's first epoch
    last = bad.user_attrs["last_metrics"]
    assert last["epoch"] == 0 and last["val_ppl"] > good.intermediate_values[0]
    assert bad.intermediate_values[0] == pytest.approx(last["val_ppl"])
    assert table["state"].tolist() == ["COMPLETE", "FAIL", "PRUNED"]

    runs = {r["config"]["trial"]: r for r in offline_runs(offline_wandb)}
    assert len(runs) == 3
    assert runs[failed.number]["exit_code"] == 1 and "failed" in runs[failed.number]["tags"]
    assert runs[failed.number]["summary"]["state"] == "failed"
    assert runs[good.number]["exit_code"] == 0 and runs[good.number]["summary"]["state"] == "complete"
    assert runs[bad.number]["summary"]["state"] == "pruned" and "pruned" in runs[bad.number]["tags"]


@pytest.mark.parametrize("text,message", [
    (TINY + "serach: {lr: [1.0]}\n", "line 6, serach: unknown key"),
    (TINY + "search:\n  lr: {type: log-float, low: 0, high: 1}\n", "line 7, search.lr: bad range"),
    (TINY.replace("rnn-bptt", "transfomer") + "search: {lr: [1.0]}\n", "line 2, model: unknown model 'transfomer'"),
    (TINY + "search: {lr: [1.0}\n", "line 6: not valid YAML"),
    (TINY.replace("hidden_size", "hiden_size") + "search: {lr: [1.0]}\n",
     "line 4, fixed.hiden_size: unknown hyper-parameter 'hiden_size' for rnn-bptt"),
    (TINY + "grid: {classes: [10, 20]}\n", "line 6, grid.classes: classes applies to output=class"),
    (TINY + "search: {lr: [1.0]}\ntrials: 0\n", "line 7, trials: must be a positive integer"),
    (TINY + "search: {lr: [1.0]}\nbudget: {epochs: 2}\n", "line 7, budget: given twice"),
    (TINY + "search: {lr: [1.0]}\nmetric: test_ppl\n", "line 7, metric: choose one of valid_ppl"),
    (TINY.replace("corpus: synthetic", "corpus: ptbx") + "search: {lr: [1.0]}\n", "line 3, corpus: corpus must be"),
], ids=["unknown-key", "bad-range", "unknown-model", "bad-yaml", "unknown-parameter", "bad-combination",
        "zero-trials", "duplicate-key", "test-metric", "unknown-corpus"])
def test_malformed_spec_exits_2_naming_key_and_line_and_writes_nothing(tmp_path, capsys, text, message):
    spec = write_spec(tmp_path, text)
    assert main(["sweep", str(spec), "--storage", f"sqlite:///{tmp_path}/results.db"]) == 2
    err = capsys.readouterr().err
    assert message in err and str(spec) in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "results.db").exists()


def sweep_command(spec: Path, storage: str, *options: str) -> list[str]:
    return [sys.executable, "-m", "bench.cli", "sweep", str(spec), "--storage", storage, "--no-wandb",
            "--no-progress", *options]


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_worker_killed_mid_trial_is_recovered_by_rerunning_the_command(tmp_path, capsys):
    """Journal storage (no heartbeat): SIGKILL the worker while a trial runs; the rerun fails that trial,
    requeues its parameters, and completes the study with exactly `trials` results."""
    spec = write_spec(tmp_path, TINY.replace("minutes: 0.01", "minutes: 0.05") + """
study: killed
search:
  lr: {type: log-float, low: 0.5, high: 5}
pruner: none
trials: 2
""")
    storage = f"journal:{tmp_path}/journal.log"
    worker = subprocess.Popen(sweep_command(spec, storage), env=subprocess_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and worker.poll() is None:
            names = optuna.get_all_study_names(open_storage(storage)) if (tmp_path / "journal.log").exists() else []
            running = names and optuna.load_study(study_name="killed", storage=open_storage(storage)).get_trials(
                states=(TrialState.RUNNING,))
            if running and "worker" in running[0].user_attrs:  # training has started
                break
            time.sleep(0.2)
        assert worker.poll() is None, "the worker ended before a trial was seen running"
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    killed = optuna.load_study(study_name="killed", storage=open_storage(storage)).trials
    assert [t.state for t in killed] == [TrialState.RUNNING]

    assert main(sweep_command(spec, storage)[3:]) == 0
    assert "trials 0: their worker is gone; failed and requeued" in capsys.readouterr().out
    trials = optuna.load_study(study_name="killed", storage=open_storage(storage)).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert "fail_reason" not in trials[0].user_attrs
    assert trials[1].params == killed[0].params and trials[1].system_attrs["failed_trial"] == 0
    assert main(sweep_command(spec, storage)[3:]) == 0
    assert "2 of 2 trials held, 0 to run" in capsys.readouterr().out


def test_a_trial_started_after_the_study_is_full_is_surplus_and_stops_its_worker(tmp_path):
    """The race of two workers for the last place: the later-numbered trial runs nothing and holds no place."""
    spec = load_spec(write_spec(tmp_path, TINY + "search: {lr: [1.0]}\ntrials: 3\n"))
    study = optuna.create_study()
    for value in (1.0, 2.0):
        study.add_trial(optuna.create_trial(value=value, user_attrs={"record": {}}))
    last_place = study.ask()  # another worker's trial took the third and last place
    study.optimize(Objective(spec, total=3, data_dir=None, wandb_mode="disabled", progress=False), n_trials=3,
                   catch=(Exception,))
    surplus = study.trials[-1]
    assert len(study.trials) == 4 and last_place.number == 2 and surplus.number == 3  # it stopped its worker
    assert surplus.state == TrialState.FAIL and "surplus" in surplus.user_attrs and not surplus.params
    assert places_taken(study) == 3  # two complete, one running; the surplus trial holds none


def postgres_url() -> str:
    """The PostgreSQL server of BENCH_TEST_POSTGRES_URL (.ci/run starts one); skip visibly without it."""
    url = os.environ.get("BENCH_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("no PostgreSQL: set BENCH_TEST_POSTGRES_URL (.ci/run starts a server and sets it)")
    try:
        open_storage(url)
    except Exception as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL at BENCH_TEST_POSTGRES_URL unreachable: {error}")
    return url


@pytest.mark.parametrize("backend", ["journal", "postgresql"])
def test_two_workers_share_one_study_and_count_every_trial_once(tmp_path, backend):
    """journal: one command with --n-jobs 2; PostgreSQL: two commands, as on two machines."""
    spec = write_spec(tmp_path, TINY.replace("minutes: 0.01", "minutes: 0.02") + f"""
study: shared-{os.getpid()}-{time.time_ns()}
search:
  lr: {{type: log-float, low: 0.5, high: 5}}
  activation: [sigmoid, tanh]
pruner: none
trials: 4
""")
    if backend == "journal":
        storage = f"journal:{tmp_path}/journal.log"
        commands = [sweep_command(spec, storage, "--n-jobs", "2")]
    else:
        storage = postgres_url()
        commands = [sweep_command(spec, storage)] * 2
    workers = [subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for command in commands]
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    assert all(worker.returncode == 0 for worker in workers), outputs
    study = optuna.load_study(study_name=load_spec(spec).study, storage=open_storage(storage))
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    others = [t for t in study.trials if t.state != TrialState.COMPLETE]
    assert len(complete) == 4 and all("record" in t.user_attrs for t in complete)
    assert all(t.state == TrialState.FAIL and "surplus" in t.user_attrs for t in others)  # a lost race, not run
    assert len({t.number for t in study.trials}) == len(study.trials)
    workers_seen = {(t.user_attrs["worker"]["host"], t.user_attrs["worker"]["pid"]) for t in complete}
    assert len(workers_seen) == 2  # both processes ran trials
    printed = [line for output in outputs for line in output.splitlines() if " COMPLETE: " in line]
    assert sorted(int(line.split()[1]) for line in printed) == sorted(t.number for t in complete), outputs


@pytest.mark.parametrize("path", SHIPPED_SPECS, ids=lambda p: p.name)
def test_every_shipped_spec_loads_and_validates_without_training(path):
    """In every default run, as lightning-hydra-template checks its configs in every CI run: load_spec parses
    the spec and puts every configuration it can produce through make_config, and builds its sampler and
    pruner; no corpus is read (run_sweep adds the vocabulary's checks), nothing trained."""
    spec = load_spec(path)
    assert spec.study == path.stem and spec.trials >= 1
    assert spec.metric in TASKS[spec.task].sweep_metrics and spec.direction == TASKS[spec.task].direction
    assert (spec.grid_size is None) == bool(spec.search) and spec.trials <= (spec.grid_size or spec.trials)
    assert spec.corpus in TASK_CORPORA[spec.task]


@pytest.mark.slow
@pytest.mark.parametrize("path", SHIPPED_SPECS, ids=lambda p: p.name)
def test_every_shipped_spec_is_valid_and_runs_a_tiny_trial(tmp_path, path, monkeypatch):
    """Like lightning-hydra-template's experiment tests: each spec, one trial, one epoch cut at ~0.6 s."""
    import dataclasses

    from bench.errors import BenchError
    from bench.harness import cached_corpus, cached_tagged_corpus

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    spec = load_spec(path)
    assert spec.trials >= 1 and spec.study == path.stem
    try:
        (cached_corpus if TASKS[spec.task] is LANGUAGE_MODEL else cached_tagged_corpus)(spec.corpus, None)
    except BenchError as error:
        pytest.skip(f"spec valid; no trial: {error}")
    counting = spec.model is not None and not model_spec(spec.model).neural  # Kneser-Ney: no epochs to cut short
    scoring = {"eval_batch_size": 64} if TASKS[spec.task] is LANGUAGE_MODEL else {}  # taggers score sentences
    tiny = spec if counting else dataclasses.replace(spec, budget={"max_epochs": 1, "max_minutes": 0.01},
                                                     fixed={**spec.fixed, **scoring})
    table = run_sweep(tiny, trials=1, storage_url=f"sqlite:///{tmp_path}/r.db", progress=False)
    assert table["state"].tolist() == ["COMPLETE"]


def test_errors_carry_their_key_as_data_and_the_spec_its_line():
    from bench.config import make_config
    from bench.sweep_spec import read_spec

    with pytest.raises(BenchError) as caught:
        make_config("rnn-bptt", {"output": "full", "classes": 10})
    assert caught.value.key == "classes"
    with pytest.raises(BenchError) as caught:
        read_spec({"model": "rnn-bptt", "search": {"lr": {"type": "float", "low": 2, "high": 1}}}, Path("s.yaml"), None)
    assert caught.value.key == ("search", "lr") and str(caught.value).startswith("bad range: ")
    with pytest.raises(BenchError) as caught:  # a configuration's error, at the spec key that set it
        read_spec({"model": "rnn-bptt", "fixed": {"classes": 10}, "search": {"lr": [1.0]}}, Path("s.yaml"), None)
    assert caught.value.key == ("fixed", "classes")


def test_seeds_repeat_every_grid_point_and_are_refused_for_a_search(tmp_path):
    spec = load_spec(write_spec(tmp_path, TINY + "grid:\n  - {output: [class], classes: [2, 4]}\n  - {output: [full]}\n"
                                                   "seeds: 2\n"))
    assert spec.grid_size == 6 and spec.trials == 6
    assert sorted((p.get("classes", 0), p["seed"]) for p in spec.grid_points.values()) == [
        (0, 0), (0, 1), (2, 0), (2, 1), (4, 0), (4, 1)]
    with pytest.raises(BenchError, match=r"spec.yaml, line \d+, seeds: seeds repeat the points of a grid"):
        load_spec(write_spec(tmp_path, TINY + "search:\n  lr: {type: float, low: 1, high: 2}\nseeds: 3\n"))
    with pytest.raises(BenchError, match="the grid sets seed itself"):
        load_spec(write_spec(tmp_path, TINY + "grid: {seed: [0, 1]}\nseeds: 2\n"))


def test_threads_follow_omp_num_threads_else_the_idle_cores(monkeypatch):
    from bench import threads

    samples = iter([(100.0, 1000.0), (150.0, 1100.0)])  # (idle, total) jiffies: half the time idle
    monkeypatch.setattr(threads, "cpu_times", lambda: next(samples))
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 4)
    assert threads.idle_cores(0) == 2.0
    monkeypatch.setenv("OMP_NUM_THREADS", "3,1")
    assert threads.compute_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads, "idle_cores", lambda: 0.3)  # another job holds every core: one thread still
    assert threads.compute_threads() == 1
    monkeypatch.setattr(threads, "idle_cores", lambda: 1.8)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    assert threads.compute_threads() == 2 and threads.compute_threads(workers=2) == 1


def test_a_budget_whose_minutes_cut_its_epochs_is_reported_with_both_numbers(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path}/results.db"
    earlier = {"model": "rnn-bptt", "corpus": "synthetic", "valid_ppl": 50.0, "minutes_per_epoch": 0.5}
    for minutes in (0.4, 0.5, 0.9):  # stored runs of the model on the corpus, in another study: median 0.5
        save_record({**earlier, "minutes_per_epoch": minutes}, open_storage(storage), "earlier")
    spec = write_spec(tmp_path, TINY.replace("epochs: 1, minutes: 0.01", "epochs: 3, minutes: 0.01")
                      + "search: {lr: [1.0]}\ntrials: 1\n")
    assert main(["sweep", str(spec), "--storage", storage, "--no-wandb", "--no-progress",
                 "--run-dir", str(tmp_path / "runs")]) == 0
    assert (f"warning: {spec}: budget epochs 3 take about 1.5 minutes here (0.5 an epoch, the median of 3 stored "
            "runs of rnn-bptt on synthetic), but minutes 0.01 stop each trial at about epoch 0.02"
            in capsys.readouterr().out)


def test_a_trial_cut_by_its_minutes_says_so():
    cut = optuna.trial.create_trial(state=TrialState.COMPLETE, value=80.0,
                                    user_attrs={"record": {"stopped_by": "max_minutes", "epochs": 0.27}})
    finished = optuna.trial.create_trial(state=TrialState.COMPLETE, value=80.0,
                                         user_attrs={"record": {"stopped_by": "schedule", "epochs": 2}})
    assert describe(cut, "valid_ppl") == "valid_ppl 80.00, cut by the minutes budget at epoch 0.27"
    assert describe(finished, "valid_ppl") == "valid_ppl 80.00"


def test_a_study_resumes_with_another_pruner_but_not_with_another_search(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path}/results.db"
    search = "study: patient\nsearch:\n  lr: {type: log-float, low: 0.5, high: 5}\nsampler: {type: random, seed: 1}\n"
    first = write_spec(tmp_path, TINY + search + "pruner: median\ntrials: 1\n")
    assert main(["sweep", str(first), "--storage", storage, "--no-progress", "--no-wandb"]) == 0
    patient = TINY + search + "pruner: {type: median, n_warmup_steps: 4}\ntrials: 2\n"
    assert main(["sweep", str(write_spec(tmp_path, patient)), "--storage", storage, "--no-progress",
                 "--no-wandb"]) == 0
    assert len(optuna.load_study(study_name="patient", storage=storage).trials) == 2
    capsys.readouterr()
    other = write_spec(tmp_path, patient.replace("high: 5", "high: 6").replace("trials: 2", "trials: 3"))
    assert main(["sweep", str(other), "--storage", storage, "--no-progress", "--no-wandb"]) == 2
    err = capsys.readouterr().err
    assert "study 'patient' exists with another spec" in err and len(err.strip().splitlines()) == 1
    assert len(optuna.load_study(study_name="patient", storage=storage).trials) == 2


def test_a_retried_trial_whose_run_folder_is_gone_trains_from_epoch_0_and_says_so(tmp_path, capsys):
    from bench.store import RequeueStaleTrials
    from bench.sweeps import open_study

    spec = write_spec(tmp_path, TINY + "study: lost\ntrials: 1\nsearch:\n  lr: {type: log-float, low: 0.5, high: 5}\n")
    storage = f"sqlite:///{tmp_path}/r.db"
    study = open_study(load_spec(spec), open_storage(storage))
    lost = study.ask({"lr": optuna.distributions.FloatDistribution(0.5, 5, log=True)})
    study.tell(lost, state=TrialState.FAIL)  # its worker died; its run folder was deleted since
    RequeueStaleTrials(max_retry=2)(study, study.trials[0])
    assert main(["sweep", str(spec), "--storage", storage, "--no-progress", "--no-wandb", "--run-dir",
                 str(tmp_path / "runs")]) == 0
    output = capsys.readouterr()
    retry = optuna.load_study(study_name="lost", storage=storage).trials[1]
    record = retry.user_attrs["record"]
    assert (record["resume_found_no_checkpoint"], record["resumed"]) == (True, 0)
    assert [point["epoch"] for point in record["curve"]] == [1]  # epoch 0 trained: one validation
    assert record["run_dir"] == str(tmp_path / "runs" / "lost" / "trial-0")
    assert "trial 1 COMPLETE: valid_ppl" in output.out
    assert ", retried from epoch 0: no checkpoint in its run folder |" in output.out
    assert f"{tmp_path / 'runs' / 'lost' / 'trial-0'}: no checkpoint of this configuration to resume from" in output.err
