"""Crashes, signals and bad input: no secret written, no study lost, one line and a promised exit code.

Exit codes (bench.cli.main): 0 done, 1 a failed run (stored as a failed trial), 2 a user error (nothing
written), 130 SIGINT, 143 SIGTERM.
"""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from bench.cli import main
from bench.data import load_corpus
from bench.errors import BenchError, RunFailed
from bench.redact import redact
from bench.reports import load_runs
from bench.store import RequeueStaleTrials, open_storage, save_record
from bench.sweep_spec import load_spec
from bench.sweeps import holds_place, run_sweep

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "Hunter2-secret"
TINY = """
model: rnn-bptt
corpus: synthetic
fixed: {hidden_size: 8, batch_size: 64, bptt: 10, eval_batch_size: 64}
budget: {epochs: 1, minutes: 5}
search: {lr: {type: log-float, low: 0.5, high: 5}}
pruner: none
"""


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def files_under(*folders: Path) -> list[Path]:
    return [path for folder in folders for path in folder.rglob("*") if path.is_file()]


# ----------------------------------------------------------------------------------------------- secrets


@pytest.mark.parametrize("text,kept", [
    (f"postgresql+psycopg://:{PASSWORD}@db-host/bench", "postgresql+psycopg://:***@db-host/bench"),
    (f"postgresql+psycopg://bench:{PASSWORD}@x@db-host:5432/bench", "postgresql+psycopg://bench:***@db-host:5432/bench"),
    (f"postgresql://bench:{PASSWORD}/y@db-host/bench?sslmode=require", "postgresql://bench:***@db-host/bench?sslmode=require"),
    (f"postgresql://db-host/bench?user=bench&password={PASSWORD}&x=1", "postgresql://db-host/bench?user=bench&password=***&x=1"),
    (f"host=db-host password={PASSWORD} dbname=bench", "host=db-host password=*** dbname=bench"),
    (f"cannot open 'postgresql://u:{PASSWORD}@h/db': refused", "cannot open 'postgresql://u:***@h/db': refused"),
    ("sqlite:///bench.db and postgresql://db-host:5432/bench", "sqlite:///bench.db and postgresql://db-host:5432/bench"),
])
def test_redact_masks_the_password_of_any_url_form(text, kept):
    assert redact(text) == kept


def test_a_password_seen_once_is_masked_wherever_it_appears_later():
    redact(f"postgresql://u:{PASSWORD}@h/db")
    assert redact(f"the server said: wrong password {PASSWORD}") == "the server said: wrong password ***"


def test_no_file_the_suite_writes_holds_the_storage_password(tmp_path, monkeypatch, capsys):
    """A sweep and a report, with the password on the process's command line (where W&B reads it) and in
    every error message; then every file written -- W&B folders, run folders, the store, the report -- is
    searched for it."""
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    secret_url = f"postgresql+psycopg://bench:{PASSWORD}@db-host.invalid:5432/bench"
    spec = tmp_path / "spec.yaml"
    spec.write_text(TINY + "study: secret\ntrials: 1\n")
    storage = f"sqlite:///{tmp_path}/results.db"
    # W&B stores sys.argv: the command line a user typed with a PostgreSQL URL
    monkeypatch.setattr(sys, "argv", ["bench", "sweep", str(spec), "--storage", secret_url])
    assert main(["sweep", str(spec), "--storage", storage, "--no-progress"]) == 0
    monkeypatch.setattr(sys, "argv", ["bench", "report", "--storage", secret_url])
    assert main(["report", "--storage", storage, "--out", str(tmp_path / "report")]) == 0
    assert main(["report", "--storage", secret_url, "--out", str(tmp_path / "report")]) == 2
    out, err = capsys.readouterr()
    assert PASSWORD not in out + err and "***" in err
    written = files_under(tmp_path)
    assert any("wandb" in str(path) for path in written) and any(path.name == "record.json" for path in written)
    assert [path for path in written if PASSWORD.encode() in path.read_bytes()] == []


# -------------------------------------------------------------------------------------------- the store


def test_a_torn_journal_line_is_cut_before_the_next_append(tmp_path, capsys):
    journal = tmp_path / "journal.log"
    storage = open_storage(f"journal:{journal}")
    study = optuna.create_study(study_name="s", storage=storage)
    study.add_trial(optuna.trial.create_trial(value=1.0))
    lines = journal.read_bytes().count(b"\n")
    with open(journal, "ab") as handle:  # a writer killed in the middle of a line
        handle.write(b'{"op_code":4,"worker_id":"x","study_id":0,"datetime_sta')
    study = optuna.load_study(study_name="s", storage=open_storage(f"journal:{journal}"))
    assert f"{journal}, line {lines + 1}: torn" in capsys.readouterr().err
    study.add_trial(optuna.trial.create_trial(value=2.0))
    assert [t.value for t in optuna.load_study(study_name="s", storage=open_storage(f"journal:{journal}")).trials] \
        == [1.0, 2.0]
    assert all(json.loads(line) for line in journal.read_bytes().splitlines())


def test_a_sweep_rerun_after_its_writer_was_killed_mid_line_completes_and_reports(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(TINY + "study: torn\ntrials: 2\n")
    storage = f"journal:{tmp_path}/journal.log"
    assert main(["sweep", str(spec), "--storage", storage, "--no-progress", "--no-wandb", "--trials", "1"]) == 0
    # a process SIGKILLed while it appends: half a record, no newline
    code = (f"import os, signal; handle = open({str(tmp_path / 'journal.log')!r}, 'ab'); "
            "handle.write(b'{\"op_code\":5,\"worker_id\":\"w\",\"trial_id\":1,\"sta'); handle.flush(); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL
    assert main(["sweep", str(spec), "--storage", storage, "--no-progress", "--no-wandb"]) == 0
    assert "torn" in capsys.readouterr().err
    trials = optuna.load_study(study_name="torn", storage=open_storage(storage)).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert main(["report", "--storage", storage, "--out", str(tmp_path / "report"), "--no-wandb"]) == 0
    assert len(load_runs(storage)) == 2


def create_and_add(url: str, barrier) -> None:
    barrier.wait()
    study = optuna.create_study(study_name="race", storage=open_storage(url), load_if_exists=True)
    study.add_trial(optuna.trial.create_trial(value=1.0))


def test_workers_creating_a_new_sqlite_database_together_both_succeed(tmp_path):
    context = multiprocessing.get_context("fork")
    for attempt in range(3):
        url = f"sqlite:///{tmp_path}/new-{attempt}.db"
        barrier = context.Barrier(2)
        workers = [context.Process(target=create_and_add, args=(url, barrier)) for _ in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(120)
        assert [worker.exitcode for worker in workers] == [0, 0]
        assert len(optuna.load_study(study_name="race", storage=url).trials) == 2


def test_a_report_writes_nothing_into_an_empty_file(tmp_path, capsys):
    empty = tmp_path / "empty.db"
    empty.touch()
    assert main(["report", "--storage", f"sqlite:///{empty}", "--out", str(tmp_path / "r"), "--no-wandb"]) == 2
    assert "empty" in one_error_line(capsys) and empty.stat().st_size == 0


# ------------------------------------------------------------------------------------------ run folders


@pytest.mark.parametrize("command", [
    ["train", "rnn-bptt", "--set", "hidden_size=8"],
    ["run", "--models", "kn"],
    ["sweep", "SPEC", "--no-wandb"],
])
@pytest.mark.parametrize("run_dir,message", [
    ("afile", "afile is a file, not a folder"),
    ("afile/runs", "afile is a file, not a folder"),
    ("/proc/no-such-process/runs", "cannot write into /proc/no-such-process/runs: No such file or directory"),
])
def test_a_run_folder_that_cannot_be_written_exits_2_and_writes_nothing(tmp_path, capsys, monkeypatch, command,
                                                                         run_dir, message):
    """Checked before anything runs: no results database, no study, no run folder, no W&B folder."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "afile", "a file where the run folder should be")
    argv = [str(write(tmp_path / "spec.yaml", TINY)) if a == "SPEC" else a for a in command]
    before = sorted(files_under(tmp_path))
    assert main([*argv, "--run-dir", run_dir, "--storage", f"sqlite:///{tmp_path}/r.db"]) == 2
    assert message in one_error_line(capsys)
    assert sorted(files_under(tmp_path)) == before and sorted(tmp_path.rglob("*")) == sorted(
        [tmp_path / "afile", *([tmp_path / "spec.yaml"] if "sweep" in command else [])])


def test_bench_train_resumes_past_a_checkpoint_of_random_bytes_with_one_warning_and_stores_no_failure(tmp_path,
                                                                                                       capsys):
    storage = f"sqlite:///{tmp_path}/r.db"
    argv = ["train", "rnn-bptt", "--set", "hidden_size=8", "--set", "max_epochs=2", "--set", "limit_train_batches=5",
            "--no-progress", "--storage", storage, "--run-dir", str(tmp_path / "runs"), "--keep", "all"]
    assert main(argv) == 0
    [folder] = (tmp_path / "runs" / "train-rnn-bptt-synthetic").iterdir()
    (folder / "record.json").unlink()  # killed after its last epoch's checkpoint, before the record
    (folder / "last.ckpt").write_bytes(os.urandom(1 << 16))
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    [warning] = capsys.readouterr().err.strip().splitlines()
    assert warning.startswith(f"bench: warning: {folder}: last.ckpt does not load (")
    assert warning.endswith("; going on from best.ckpt (epoch 2)")
    first, again = optuna.load_study(study_name="train-rnn-bptt-synthetic", storage=storage).trials
    assert (first.state, again.state) == (TrialState.COMPLETE, TrialState.COMPLETE)
    assert again.user_attrs["record"]["recovered_from"] == [{"damaged": ["last.ckpt"], "checkpoint": "best.ckpt",
                                                             "epoch": 2}]
    assert again.value == pytest.approx(first.value, rel=1e-9)


# ------------------------------------------------------------------------------------- bounded retries


def test_a_stale_trial_is_requeued_max_retry_times_then_failed_with_its_reason():
    study = optuna.create_study()
    requeue = RequeueStaleTrials(max_retry=1)
    for number in (0, 1):  # the trial, then its one retry: their worker died
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        study.tell(trial, state=TrialState.FAIL)
        requeue(study, study.trials[number])
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.FAIL, TrialState.FAIL]
    first, retry, given_up = study.trials
    assert retry.params == given_up.params == first.params
    assert given_up.user_attrs["fail_reason"] == ("its worker stopped 2 times (killed, or out of memory), trials 0, "
                                                  "1; not retried more than max_retry 1")
    assert [holds_place(t) for t in study.trials] == [False, False, True]


def test_a_trial_that_kills_its_worker_every_time_is_failed_after_max_retry_retries(tmp_path, capsys):
    """Journal storage: the next command requeues the trial whose worker is gone, --max-retry 1 times."""
    spec = write(tmp_path / "spec.yaml", TINY + "study: oom\ntrials: 1\n")
    argv = ["sweep", str(spec), "--storage", f"journal:{tmp_path}/journal.log", "--no-wandb", "--no-progress",
            "--run-dir", str(tmp_path / "runs"), "--max-retry", "1"]
    for _ in range(2):  # killed as its first checkpoint is written
        killed = subprocess.run([sys.executable, str(ROOT / "tests" / "kill_bench.py"), "checkpoint", "1", *argv],
                                cwd=tmp_path, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert main(argv) == 0
    assert "1 of 1 trials held, 0 to run" in capsys.readouterr().out
    trials = optuna.load_study(study_name="oom", storage=open_storage(f"journal:{tmp_path}/journal.log")).trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 3
    assert trials[2].user_attrs["fail_reason"].startswith("its worker stopped 2 times")


# ----------------------------------------------------------------------------------------- failed runs


def test_a_diverged_run_is_stored_as_a_failed_trial_with_its_reason(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path}/r.db")
    with pytest.raises(RunFailed, match="valid_ppl is nan"):
        save_record({"model": "rnn-bptt", "corpus": "synthetic", "valid_ppl": float("nan"), "config": {}}, storage, "t")
    [trial] = optuna.load_study(study_name="t", storage=storage).trials
    assert trial.state == TrialState.FAIL and "diverged" in trial.user_attrs["fail_reason"]
    assert trial.user_attrs["record"]["config"] == {}


@pytest.mark.parametrize("outcome,reason", [
    ({"valid_ppl": float("inf")}, "valid_ppl is inf (the run diverged)"),
    (RuntimeError("the optimizer blew up"), "RuntimeError: the optimizer blew up"),
])
def test_bench_train_of_a_failed_run_exits_1_with_one_line_and_keeps_the_run(tmp_path, capsys, monkeypatch,
                                                                             outcome, reason):
    def run_experiment(config, **options):
        if isinstance(outcome, Exception):
            raise outcome
        return {"model": config["model"], "corpus": config["corpus"], "config": config, **outcome}

    monkeypatch.setattr("bench.harness.run_experiment", run_experiment)
    storage = f"sqlite:///{tmp_path}/r.db"
    assert main(["train", "rnn-bptt", "--set", "lr=10000", "--storage", storage, "--run-dir", str(tmp_path)]) == 1
    assert reason in one_error_line(capsys)
    [trial] = optuna.load_study(study_name="train-rnn-bptt-synthetic", storage=storage).trials
    assert trial.state == TrialState.FAIL and trial.user_attrs["fail_reason"] == reason


# --------------------------------------------------------------------------------------------- signals


def bench_process(*argv: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench.cli", *argv], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"})


def wait_for_line(process: subprocess.Popen, text: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if text in line:
            return
        assert line or process.poll() is None, f"ended before {text!r}: {process.stderr.read()}"
    raise AssertionError(f"no {text!r} within {seconds} s")


@pytest.mark.parametrize("number,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_training_exits_128_plus_its_number_with_one_line(tmp_path, number, code):
    process = bench_process("train", "rnn-bptt", "--set", "hidden_size=8", "--set", "max_epochs=1000",
                            "--set", "limit_train_batches=5", "--no-progress", "--storage",
                            f"sqlite:///{tmp_path}/r.db", cwd=tmp_path)
    wait_for_line(process, "epoch 1:")
    process.send_signal(number)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code and err.strip().splitlines()[-1] == "bench: interrupted"
    assert "Traceback" not in err


def test_a_signal_during_a_sweep_requeues_its_trial_and_the_next_command_resumes_it(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(TINY.replace("epochs: 1", "epochs: 1000").replace("eval_batch_size: 64", "eval_batch_size: 64, "
                                                                     "limit_train_batches: 5")
                    + "study: stopped\ntrials: 1\n")
    storage = f"sqlite:///{tmp_path}/r.db"
    process = bench_process("sweep", str(spec), "--storage", storage, "--no-progress", "--run-dir",
                            str(tmp_path / "runs"), cwd=tmp_path)
    # epoch 2's line: epoch 1's checkpoint is on disk (its own line prints before the checkpoint callbacks run)
    wait_for_line(process, "epoch 2:")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143 and err.strip().splitlines()[-1] == "bench: interrupted"
    trials = optuna.load_study(study_name="stopped", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].params == trials[0].params and "fail_reason" not in trials[0].user_attrs
    assert (tmp_path / "runs" / "stopped" / "trial-0" / "last.ckpt").is_file()  # what the copy resumes from


# ------------------------------------------------------------------------------- specs that cannot run


def test_a_grid_of_more_classes_than_words_is_refused_before_the_study_exists(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(TINY.replace("search: {lr: {type: log-float, low: 0.5, high: 5}}\n", "")
                    + "study: classes\ngrid:\n  output: [class]\n  classes: [10, 1000000]\n")
    storage = f"sqlite:///{tmp_path}/r.db"
    with pytest.raises(BenchError, match=r"line \d+, grid.classes: classes must be between 1 and \|V\|="):
        run_sweep(load_spec(spec), storage_url=storage, use_wandb=False)
    assert optuna.get_all_study_names(storage) == []


def test_set_reads_numbers_as_yaml_1_2_does(tmp_path, capsys, monkeypatch):
    seen = {}
    monkeypatch.setattr("bench.harness.run_experiment", lambda config, **options: seen.update(config) or 1 / 0)
    main(["train", "rnn-bptt", "--set", "lr=1e-3", "--set", "l2=2.5E-7", "--storage", f"sqlite:///{tmp_path}/r.db"])
    assert seen["lr"] == 0.001 and seen["l2"] == 2.5e-7


# ------------------------------------------------------------------------------------- every bad input


def write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(9))
PTB_LINES = "".join(f" the cat sat on the mat {i % 7} \n" for i in range(40))


def ptb_with(tmp_path: Path, split: str, content) -> list[str]:
    for name in ("train", "valid", "test"):
        write(tmp_path / "data" / "ptb" / f"ptb.{name}.txt", PTB_LINES)
    write(tmp_path / "data" / "ptb" / f"ptb.{split}.txt", content)
    return ["train", "kn", "--corpus", "ptb", "--data-dir", str(tmp_path / "data")]


def conll_with(tmp_path: Path, content) -> list[str]:
    write(tmp_path / "data" / "conll2000" / "test.txt", "He PRP B-NP\nran VBD B-VP\n\n")
    write(tmp_path / "data" / "conll2000" / "train.txt", content)
    return ["train", "birnn", "--corpus", "conll2000", "--data-dir", str(tmp_path / "data")]


def spec_with(tmp_path: Path, content) -> list[str]:
    return ["sweep", str(write(tmp_path / "spec.yaml", content)), "--no-wandb"]


def baseline_with(tmp_path: Path, content) -> list[str]:
    return ["regress", "--models", "kn", "--baseline", str(write(tmp_path / "baseline.json", content)),
            "--out", str(tmp_path / "regress")]


def damaged_sqlite(tmp_path: Path) -> list[str]:
    path = tmp_path / "damaged.db"
    storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
    study = optuna.create_study(study_name="s", storage=storage)
    for value in range(200):
        study.add_trial(optuna.trial.create_trial(value=float(value), user_attrs={"pad": "x" * 500}))
    storage.engine.dispose()
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = os.urandom(4096)
    path.write_bytes(bytes(data))
    return ["report", "--storage", f"sqlite:///{path}", "--no-wandb", "--out", str(tmp_path / "r")]


def damaged_journal(tmp_path: Path) -> list[str]:
    path = tmp_path / "journal.log"
    optuna.create_study(study_name="s", storage=open_storage(f"journal:{path}"))
    path.write_bytes(path.read_bytes() + b'{"op_code"{"op_code":0}\n' + path.read_bytes())
    return ["report", "--storage", f"journal:{path}", "--no-wandb", "--out", str(tmp_path / "r")]


def unwritable_out(tmp_path: Path) -> list[str]:
    storage = open_storage(f"sqlite:///{tmp_path}/r.db")
    save_record({"model": "kn", "corpus": "synthetic", "valid_ppl": 10.0, "test_ppl": 10.0, "config": {}}, storage,
                "s")
    write(tmp_path / "taken", "a file where the folder's parent should be")
    return ["report", "--storage", f"sqlite:///{tmp_path}/r.db", "--no-wandb", "--out", str(tmp_path / "taken" / "r")]


MALFORMED = {
    # specs
    "spec of random bytes": (lambda t: spec_with(t, bytes(range(128, 256)) * 4), "spec.yaml, line 1: not UTF-8"),
    "spec alias bomb": (lambda t: spec_with(t, ALIAS_BOMB), "an alias bomb"),
    "spec nested too deeply": (lambda t: spec_with(t, "[" * 20000), "nested too deeply"),
    "spec sampler option of the wrong type": (lambda t: spec_with(t, TINY + "sampler: {type: tpe, n_startup_trials: "
                                                                  "many}\n"), "sampler.n_startup_trials: must be int"),
    "spec negative sampler count": (lambda t: spec_with(t, TINY + "sampler: {type: tpe, n_startup_trials: -1}\n"),
                                    "sampler.n_startup_trials: must not be negative"),
    "spec study name too long": (lambda t: spec_with(t, TINY + f"study: {'s' * 600}\n"), "study: must be at most 512"),
    "spec negative max_retry": (lambda t: spec_with(t, TINY + "max_retry: -1\n"), "max_retry: must be a whole number"),
    # corpora
    "binary corpus": (lambda t: ptb_with(t, "valid", os.urandom(64) + b"\xff"), "ptb.valid.txt, line"),
    "UTF-16 corpus": (lambda t: ptb_with(t, "train", PTB_LINES.encode("utf-16")), "ptb.train.txt, line 1: not UTF-8"),
    "one Latin-1 byte": (lambda t: ptb_with(t, "test", b"the cat\nsat \xe9 mat\n"), "ptb.test.txt, line 2: not UTF-8"),
    # tagging files
    "tagging line of 2 columns": (lambda t: conll_with(t, "He PRP B-NP\nran VBD\n"), "train.txt:2: expected 3 columns"),
    "tagging file in Latin-1": (lambda t: conll_with(t, "Jos\xe9 NNP B-NP\n".encode("latin-1")),
                                "train.txt, line 1: not UTF-8"),
    # baselines
    "baseline nested too deeply": (lambda t: baseline_with(t, "[" * 100000 + "]" * 100000), "nested too deeply"),
    "baseline in UTF-16": (lambda t: baseline_with(t, '{"meta": {}}'.encode("utf-16")), "not JSON"),
    "baseline sharing no run": (lambda t: baseline_with(t, json.dumps({"meta": {}, "runs": {"lstm/ptb": {
        "task": "lm", "config": {}, "quality": {"test_ppl": 1.0}}}})), "shares no run with this set"),
    # storage URLs
    "damaged SQLite database": (damaged_sqlite, "damaged.db: the SQLite database is damaged"),
    "damaged journal line": (damaged_journal, "journal.log, line"),
    "not a database": (lambda t: ["report", "--storage", f"sqlite:///{write(t / 'x.db', 'hello')}", "--no-wandb"],
                       "x.db: not an SQLite database"),
    "unknown storage scheme": (lambda t: ["train", "kn", "--storage", "mysqlx://u:pw@h/db"], "cannot open storage"),
    "unreachable PostgreSQL with a password": (
        lambda t: ["train", "kn", "--storage", f"postgresql+psycopg://:{PASSWORD}@db-host.invalid/bench"],
        "postgresql+psycopg://:***@db-host.invalid/bench"),
    "report into an unwritable folder": (unwritable_out, "cannot write into"),
    # --set values
    "--set not a number": (lambda t: ["train", "kn", "--set", "order=five"], "order must be int"),
    "--set NaN": (lambda t: ["train", "rnn-bptt", "--set", "lr=.nan"], "lr must be between"),
    "--set unclosed list": (lambda t: ["train", "lstm", "--set", "cutoffs=[1"], "--set 'cutoffs=[1'"),
    "--set undefined alias": (lambda t: ["train", "lstm", "--set", "lr=*a"], "--set 'lr=*a'"),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_every_malformed_input_exits_2_with_one_line_naming_it(tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    make, message = MALFORMED[name]
    argv = make(tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert message in line and PASSWORD not in line


def test_a_missing_split_is_named(tmp_path):
    ptb_with(tmp_path, "test", PTB_LINES)
    (tmp_path / "data" / "ptb" / "ptb.test.txt").unlink()
    with pytest.raises(BenchError, match=r"ptb/ptb\.test\.txt missing"):
        load_corpus("ptb", tmp_path / "data")
