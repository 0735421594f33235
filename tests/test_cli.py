import subprocess
import sys

import optuna
import pytest

from bench.cli import main


@pytest.mark.parametrize("argv,message", [
    (["train", "transformer"], "unknown model 'transformer'"),
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
