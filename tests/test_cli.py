import subprocess
import sys

import optuna
import pytest

from bench.cli import main


@pytest.mark.parametrize("argv,message", [
    (["train", "transfomer"], "unknown model 'transfomer'"),
    (["train", "lstm", "--corpus", "ptbx"], "corpus must be one of"),
    (["train", "lstm", "--set", "hiden_size=3"], "unknown hyper-parameter 'hiden_size' for lstm"),
    (["train", "lstm", "--set", "dropout=1.5"], "dropout must be between 0 and 0.99, got 1.5"),
    (["train", "lstm", "--set", "layers=two"], "layers must be int, got 'two'"),
    (["train", "lstm", "--set", "classes=10"], "classes applies to output=class"),
    (["train", "rnn-bp", "--set", "backprop=bptt"], "backprop is fixed for rnn-bp"),
    (["train", "lstm", "--set", "lr"], "expected key=value"),
    (["trian"], "invalid choice: 'trian'"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    storage = f"sqlite:///{tmp_path}/results.db"
    assert main([*argv, "--storage", storage] if argv[0] == "train" else argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "results.db").exists()


def test_missing_corpus_exits_2_naming_the_files_and_stores_no_result(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path}/results.db"
    assert main(["train", "lstm", "--corpus", "wikitext-2", "--data-dir", str(tmp_path), "--storage", storage]) == 2
    err = capsys.readouterr().err.strip()
    assert "put wikitext-2/train.txt, wikitext-2/valid.txt, wikitext-2/test.txt under" in err
    assert len(err.splitlines()) == 1
    assert optuna.get_all_study_summaries(storage) == []


def test_console_script_help_and_exit_code():
    done = subprocess.run([sys.executable, "-m", "bench.cli", "train", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--set KEY=VALUE" in done.stdout
    done = subprocess.run([sys.executable, "-m", "bench.cli", "train"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_run_prints_each_row_as_its_model_finishes_and_the_finished_ones_when_stopped(tmp_path, capsys, monkeypatch):
    import bench.harness

    real = bench.harness.run_experiment
    calls = []

    def second_run_interrupted(config, **kwargs):
        calls.append(config["model"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real({**config, "max_epochs": 1, "limit_train_batches": 5}, **kwargs)

    monkeypatch.setattr(bench.harness, "run_experiment", second_run_interrupted)
    argv = ["run", "--models", "kn", "rnn-bptt", "lstm", "--storage", f"sqlite:///{tmp_path}/r.db", "--run-dir",
            str(tmp_path / "runs"), "--no-progress"]
    assert main(argv) == 130
    out = capsys.readouterr().out
    first_row = out.index("   kn synthetic")  # kn's row printed after its run, before the second run started
    assert first_row < out.index("[2/3] rnn-bptt") < out.index("Stopped after 1 of 3 runs:")
    assert calls == ["kn", "rnn-bptt"]


def test_seeds_make_one_stored_run_each(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path}/r.db"
    argv = ["train", "kn", "--corpus", "synthetic", "--set", "order=2", "--seeds", "2", "--storage", storage,
            "--run-dir", str(tmp_path / "runs"), "--no-progress"]
    assert main(argv) == 0
    trials = optuna.load_study(study_name="train-kn-synthetic", storage=storage).trials
    assert [t.user_attrs["record"]["seed"] for t in trials] == [0, 1]
    assert main([*argv, "--resume"]) == 0  # finished runs are not run again, nor stored twice
    assert "seed 1: finished earlier" in capsys.readouterr().out
    assert len(optuna.load_study(study_name="train-kn-synthetic", storage=storage).trials) == 2
