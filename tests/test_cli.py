import os
import subprocess
import sys

import optuna
import pytest

from bench.cli import build_parser, main, show_progress
from bench.config import allowed_keys, make_config


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
    (["train", "lstm", "--set", "precision=64"], "precision must be one of 32, bf16-mixed, 16-mixed, got 64"),
    (["train", "lstm", "--set", "accelerator=tpu"], "accelerator must be one of auto, cpu, gpu, cuda, mps"),
    (["train", "lstm", "--set", "strategy=ddp_spawn"], "strategy must be one of auto, ddp, got 'ddp_spawn'"),
    (["train", "lstm", "--set", "devices=0"], "devices must be between 1 and 4096, got 0"),
    (["train", "lstm", "--set", "devices=3"], "batch_size 20 does not split into 3 equal shares of streams"),
    (["train", "kn", "--set", "devices=2"], "unknown hyper-parameter 'devices' for kn"),
    (["train", "birnn", "--set", "devices=2"], "it is for language models only"),
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
    assert (f"wikitext-2/train.txt, wikitext-2/valid.txt, wikitext-2/test.txt missing under {tmp_path}" in err
            and err.endswith("not tried: HF_HUB_OFFLINE is set"))
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "results.db").exists()


MISSING_CORPUS_WITHOUT_TORCH = """
import sys
from bench.cli import main
import bench.corpora
bench.corpora.HUB_HOST = "bench-test.invalid"  # a name that never resolves: the Hub unreachable
code = main(sys.argv[1:])
assert code == 2, code
heavy = sorted(m for m in ("torch", "lightning", "datasets", "optuna") if m in sys.modules)
assert not heavy, heavy
"""


@pytest.mark.parametrize("argv", [["train", "gru", "--corpus", "ptb"], ["run", "--corpus", "conll2000"]])
def test_missing_corpus_without_network_fails_before_loading_torch(tmp_path, argv):
    """0.85 s on this machine, against 34 s of `datasets` retrying the Hub with no network."""
    environment = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    done = subprocess.run([sys.executable, "-c", MISSING_CORPUS_WITHOUT_TORCH, *argv, "--data-dir", str(tmp_path)],
                          capture_output=True, text=True, env=environment)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("\n") == 1 and "bench-test.invalid did not answer within 2 s" in done.stderr
    assert f"missing under {tmp_path}" in done.stderr


def test_console_script_help_and_exit_code():
    done = subprocess.run([sys.executable, "-m", "bench.cli", "train", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--set KEY=VALUE" in done.stdout
    done = subprocess.run([sys.executable, "-m", "bench.cli", "train"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_train_prints_its_table_and_none_of_lightnings_banners(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.cli", "train", "kn", "--no-progress", "--run-dir",
                           str(tmp_path / "runs"), "--storage", f"sqlite:///{tmp_path}/results.db"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "test ppl" in done.stdout
    assert not any(banner in done.stdout + done.stderr for banner in ("Tip", "GPU available", "LOCAL_RANK"))


HELP_WITHOUT_TORCH = """
import sys
from bench.cli import main
from bench.config import allowed_keys, make_config
try:
    main(sys.argv[1:])
except SystemExit as done:
    assert done.code == 0, done.code
heavy = sorted(m for m in ("torch", "lightning", "wandb", "datasets", "optuna") if m in sys.modules)
assert not heavy, heavy
"""


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["train", "lstm", "--help"], ["sweep", "--help"],
                                  ["run", "--help"], ["report", "--help"], ["regress", "--help"]])
def test_help_imports_no_heavy_library(argv):
    """Help answers at once (0.8 s, against 7-12 s when it imported Lightning: 7 s of import on this machine)."""
    done = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH, *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_plugin_help_lists_its_unbounded_parameters_without_a_range(capsys):
    with pytest.raises(SystemExit) as done:
        main(["train", "transformer", "--help"])
    assert done.value.code == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.split("hyper-parameters of")[1]
            .splitlines()[2:] if line.strip()}
    assert rows["heads"][1:3] == ["int", "4"] and rows["lr"][2:5] == ["1e-08", "..", "10,000"]


def test_model_help_lists_each_hyper_parameter_with_its_type_range_and_default(capsys):
    with pytest.raises(SystemExit) as done:
        main(["train", "rnn-bptt", "--help"])
    assert done.value.code == 0
    lines = capsys.readouterr().out.split("hyper-parameters of rnn-bptt")[1].splitlines()
    rows = {line.split()[0]: line.split() for line in lines[2:] if line.strip()}
    config = make_config("rnn-bptt")
    assert set(rows) == set(allowed_keys("rnn-bptt")) | {"backprop"} and set(config) - {"model"} <= set(rows)
    assert rows["lr"][1:5] == ["float", "1e-08", "..", "10,000"] and float(rows["lr"][5]) == config["lr"]
    assert rows["activation"][1:6] == ["str", "sigmoid,", "tanh,", "relu", "sigmoid"]
    assert rows["corpus"][2:7] == ["synthetic,", "ptb,", "wikitext-2,", "wikitext-103", "synthetic"]  # the task's
    assert rows["backprop"][1:3] == ["fixed", "bptt"]
    assert main(["train", "nope", "--help"]) == 2


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


@pytest.mark.parametrize("terminal,flags,shown", [(True, [], True), (True, ["--no-progress"], False),
                                                  (False, [], False)])
def test_progress_bars_show_on_a_terminal_only(monkeypatch, terminal, flags, shown):
    monkeypatch.setattr("sys.stdout.isatty", lambda: terminal)
    for command in (["train", "kn", *flags], ["sweep", "spec.yaml", *flags]):
        assert show_progress(build_parser().parse_args(command)) is shown
