"""Models from outside the suite (bench.models.plugins): an installed package's entry point and the
module.path:ClassName form, through train, sweep, report and regress; and the one-line errors of broken ones."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest

from bench.cli import main
from bench.config import make_config
from bench.errors import BenchError
from bench.models.plugins import model_names, plugin_spec
from bench.sweep_spec import load_spec

EXAMPLE = Path(__file__).parent / "plugin_example"
EXAMPLE_PLUGIN = {"name": "tiny-gru", "source": "entry point", "target": "bench_plugin_example:TinyGRU",
                  "package": "bench-plugin-example", "version": "0.1.0"}
# Plugins of a user's own module (the module.path:ClassName form), valid and broken.
USER_MODELS = '''
from typing import Literal

import torch
from torch import nn

from bench.models.base import LanguageModel, Tagger


class Bag(LanguageModel):
    """The mean of the embeddings of the words so far (the state: their sum and count)."""
    DEFAULTS = dict(bptt=8, lr=0.01)

    def __init__(self, vocab, width: int = 8, mixing: Literal["sum", "mean"] = "mean", scale: float = 1.0,
                 tied: bool = False, **options):
        super().__init__(vocab, width, **options)
        self.embedding = nn.Embedding(len(vocab), width)

    def init_state(self, batch_size):
        return torch.zeros(batch_size, self.embedding.embedding_dim + 1, device=self.device)

    def forward(self, inputs, state):
        sums = state[:, None, :-1] + self.embedding(inputs).cumsum(1)
        counts = state[:, None, -1:] + torch.arange(1, inputs.shape[1] + 1, device=self.device)[None, :, None]
        return sums / counts, torch.cat([sums[:, -1], counts[:, -1]], dim=1)


class WordTagger(Tagger):
    """Each word's tag from its embedding alone."""

    def __init__(self, vocab_size, tags, width: int = 8, **options):
        super().__init__(vocab_size, tags, **options)
        self.embedding = nn.Embedding(vocab_size, width)
        self.decoder = nn.Linear(width, len(tags))

    def forward(self, words, lengths):
        return self.decoder(self.embedding(words))


class NoForward(LanguageModel):
    def __init__(self, vocab, width: int = 8, **options):
        super().__init__(vocab, width, **options)

    def init_state(self, batch_size):
        return torch.zeros(batch_size, 1)


class NoOptions(Bag):
    def __init__(self, vocab, width: int = 8):
        super().__init__(vocab, width)


class TupleSizes(Bag):
    def __init__(self, vocab, sizes: tuple = (8, 8), **options):
        super().__init__(vocab, sizes[0], **options)


class NoDefault(Bag):
    def __init__(self, vocab, width: int, **options):
        super().__init__(vocab, width, **options)


class TypoInDefaults(Bag):
    DEFAULTS = dict(lrr=0.1)


class NotAModel:
    pass


not_a_class = 3
'''


def install_example(target: Path, work: Path) -> None:
    """pip install tests/plugin_example into `target`, as a user would install their package (from a copy:
    setuptools builds in the source folder)."""
    source = shutil.copytree(EXAMPLE, work / "plugin_example")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True)


def fake_distribution(site: Path, name: str, entry_points: str) -> None:
    """An installed distribution's metadata, as pip writes it, holding only entry points."""
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[bench.models]\n{entry_points}\n")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A folder on this process's sys.path and the subprocesses' PYTHONPATH holding the installed example
    package and the user's own module."""
    site = tmp_path_factory.mktemp("site")
    install_example(site, tmp_path_factory.mktemp("build"))
    (site / "user_models.py").write_text(USER_MODELS)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(site))
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
        yield site
    for module in ("bench_plugin_example", "user_models"):
        sys.modules.pop(module, None)
    plugin_spec.cache_clear()


def records(storage: str, study: str) -> list[dict]:
    return [t.user_attrs["record"] for t in optuna.load_study(study_name=study, storage=storage).trials]


def test_an_installed_plugin_trains_sweeps_reports_and_regresses(site, tmp_path):
    assert "tiny-gru" in model_names()
    storage = f"sqlite:///{tmp_path}/results.db"
    common = ["--storage", storage, "--run-dir", str(tmp_path / "runs"), "--no-progress"]
    short = ["--set", "max_epochs=1", "--set", "limit_train_batches=5", "--set", "kn_order=3"]
    assert main(["train", "tiny-gru", "--set", "width=16", *short, *common]) == 0
    assert main(["train", "bench_plugin_example:TinyGRU", *short, *common]) == 0
    (record,) = records(storage, "train-tiny-gru-synthetic")
    assert record["plugin"] == EXAMPLE_PLUGIN
    # its constructor's width, the class's DEFAULTS (Adam at 3e-3, 16 streams of 20 steps), the suite's output
    keys = ("width", "dropout", "optimizer", "lr", "batch_size", "bptt", "output")
    assert {k: record["config"][k] for k in keys} == {"width": 16, "dropout": 0.0, "optimizer": "adam", "lr": 3e-3,
                                                      "batch_size": 16, "bptt": 20, "output": "full"}
    assert record["epochs"] == 1 and record["stopped_by"] == "limit_train_batches" and record["nn_kn_test_ppl"] > 1
    (by_path,) = records(storage, "train-bench_plugin_example:TinyGRU-synthetic")
    assert by_path["plugin"] == {**EXAMPLE_PLUGIN, "name": "bench_plugin_example:TinyGRU", "source": "path"}
    assert by_path["config"]["width"] == 64 and by_path["parameters"] > record["parameters"]

    spec = tmp_path / "tiny-gru-lr.yaml"
    spec.write_text("model: tiny-gru\nfixed: {width: 16, limit_train_batches: 5, kn_order: 3}\n"
                    "search:\n  lr: {type: log-float, low: 0.001, high: 0.01}\ntrials: 2\nbudget: {epochs: 2}\n")
    assert main(["sweep", str(spec), "--no-wandb", *common]) == 0
    trials = optuna.load_study(study_name="tiny-gru-lr", storage=storage).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert all(t.user_attrs["record"]["plugin"] == EXAMPLE_PLUGIN and t.user_attrs["record"]["epochs"] == 2
               for t in trials)

    assert main(["report", "--storage", storage, "--out", str(tmp_path / "report"), "--no-wandb"]) == 0
    board = pd.read_csv(tmp_path / "report" / "leaderboard.csv", comment="#")
    assert sorted(board["model"]) == ["bench_plugin_example:TinyGRU", "tiny-gru"]
    best = board.set_index("model").loc["tiny-gru"]  # the best of its train run and its two trials
    best_valid = min(r["valid_ppl"] for r in records(storage, "tiny-gru-lr") + [record])
    assert best["valid ppl"] == pytest.approx(best_valid) and best["test ppl (NN+KN)"] > 1

    (tmp_path / "data").mkdir()  # no PTB: the synthetic runs only
    argv = ["regress", "--models", "tiny-gru", "--batches", "4", "--repeats", "1", "--speed-seconds", "0.05",
            "--data-dir", str(tmp_path / "data"), "--baseline", str(tmp_path / "baseline.json")]
    assert main([*argv, "--update", "--out", str(tmp_path / "regress")]) == 0
    baseline = json.loads((tmp_path / "baseline.json").read_text())
    (run,) = baseline["runs"].values()
    assert run["model"] == "tiny-gru" and run["config"]["limit_train_batches"] == 4
    assert run["quality"]["test_ppl"] > 1 and run["speed"]["ratio"] > 0


def test_a_plugin_tagger_trains_on_the_tagging_corpus(site, tmp_path):
    storage = f"sqlite:///{tmp_path}/results.db"
    assert main(["train", "user_models:WordTagger", "--set", "max_epochs=1", "--set", "limit_train_batches=3",
                 "--storage", storage, "--run-dir", str(tmp_path / "runs"), "--no-progress"]) == 0
    (record,) = records(storage, "train-user_models:WordTagger-synthetic")
    assert 0 <= record["test_f1"] <= 1 and record["plugin"]["source"] == "path" and record["plugin"]["package"] is None


def test_plugin_hyper_parameters_are_validated_like_the_built_ins(site):
    config = make_config("user_models:Bag", {"mixing": "sum", "scale": 2, "tied": True})
    assert {k: config[k] for k in ("width", "mixing", "scale", "tied", "bptt", "lr", "optimizer")} == \
        {"width": 8, "mixing": "sum", "scale": 2.0, "tied": True, "bptt": 8, "lr": 0.01, "optimizer": "adam"}
    with pytest.raises(BenchError, match="user_models:WordTagger needs a tagging corpus"):
        make_config("user_models:WordTagger", {"corpus": "ptb"})
    with pytest.raises(BenchError, match="unknown hyper-parameter 'bptt' for user_models:WordTagger"):
        make_config("user_models:WordTagger", {"bptt": 5})


@pytest.mark.parametrize("model,sets,message", [
    ("user_models:Bag", ["widht=3"],
     "unknown hyper-parameter 'widht' for user_models:Bag; known: accelerator, batch_size, bptt"),
    ("user_models:Bag", ["width=big"], "width must be int, got 'big'"),
    ("user_models:Bag", ["mixing=max"], "mixing must be one of sum, mean, got 'max'"),
    ("user_models:Bag", ["tied=3"], "tied must be bool, got 3"),
    ("nonsense", [], "unknown model 'nonsense': choose one of kn, ffnn"),
    ("no_such_module:Model", [], "model plugin 'no_such_module:Model': cannot import no_such_module:Model: "
                                 "ModuleNotFoundError: No module named 'no_such_module'"),
    ("user_models:Missing", [], "model plugin 'user_models:Missing': module user_models has no 'Missing'"),
    ("user_models:not_a_class", [], "(user_models:not_a_class) is not a class but int"),
    ("user_models:NotAModel", [], "is not a subclass of bench.models.base.LanguageModel or bench.models.base.Tagger"),
    ("user_models:NoForward", [], "(user_models:NoForward) does not implement forward"),
    ("user_models:NoOptions", [], "__init__ must take **options and pass them on to LanguageModel.__init__"),
    ("user_models:TupleSizes", [], "__init__ parameter 'sizes' is typed tuple; a hyper-parameter is int, float"),
    ("user_models:NoDefault", [], "__init__ parameter 'width' needs a default"),
    ("user_models:TypoInDefaults", [], "DEFAULTS sets unknown hyper-parameter 'lrr'; known: accelerator, batch_size"),
    ("broken-entry", [], "model plugin 'broken-entry': cannot import missing_module:Model: ModuleNotFoundError"),
])
def test_a_broken_plugin_or_bad_setting_exits_2_with_one_line(site, tmp_path, monkeypatch, capsys, model, sets,
                                                              message):
    fake_distribution(tmp_path / "other-site", "broken", "broken-entry = missing_module:Model")
    monkeypatch.syspath_prepend(str(tmp_path / "other-site"))
    storage = f"sqlite:///{tmp_path}/results.db"
    assert main(["train", model, *[f"--set={s}" for s in sets], "--storage", storage]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "results.db").exists()


def test_an_entry_point_may_not_take_a_built_in_name(site, tmp_path, monkeypatch, capsys):
    fake_distribution(tmp_path / "other-site", "impostor", "lstm = user_models:Bag")
    monkeypatch.syspath_prepend(str(tmp_path / "other-site"))
    assert main(["train", "user_models:Bag", "--storage", f"sqlite:///{tmp_path}/results.db"]) == 2
    assert "model plugin 'lstm' of package impostor 1.0 has the name of a built-in model" in capsys.readouterr().err


def test_a_sweep_spec_names_a_plugin_and_its_mistakes_by_line(site, tmp_path):
    spec = tmp_path / "bag.yaml"
    spec.write_text("corpus: synthetic\nmodel: user_models:Bag\nsearch:\n  mixing: [sum, mean]\ntrials: 2\n")
    assert load_spec(spec).task == "lm"
    spec.write_text("corpus: synthetic\nmodel: user_models:NoForward\nsearch:\n  width: [4, 8]\n")
    with pytest.raises(BenchError, match=r"bag.yaml, line 2, model: model plugin .* does not implement forward"):
        load_spec(spec)
    spec.write_text("corpus: synthetic\nmodel: user_models:Bag\nsearch:\n  mixing: [sum, max]\n")
    with pytest.raises(BenchError, match="mixing must be one of sum, mean, got 'max'"):
        load_spec(spec)
