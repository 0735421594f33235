import itertools
import math
import re
import shutil
import subprocess
from pathlib import Path

import optuna
import pandas as pd
import pytest

from bench.cli import main
from bench.report_pages import README_BLOCK, paper_tables_markdown
from bench.report_plots import pareto_front
from bench.reports import (
    best_per_configuration,
    build_wandb_report,
    load_runs,
    make_report,
    table2,
    table3,
)
from bench.store import open_storage, save_record

SEARCHED = itertools.count()


def record(model, corpus="synthetic", valid=100.0, test=110.0, output="full", classes=None, seed=0, **extra):
    """A run's record; each call another searched setting (its own lr) unless `lr` is given."""
    config = {"model": model, "corpus": corpus, "output": output, **({"classes": classes} if classes else {}),
              "lr": extra.pop("lr", next(SEARCHED)), "seed": seed, **({} if model == "kn" else {"schedule": "rnnlm"})}
    return {"model": model, "corpus": corpus, "valid_ppl": valid, "test_ppl": test, "tokens_per_second": 1000.0,
            "minutes_per_epoch": 0.5, "test_seconds": 2.0, "parameters": 12345, "peak_memory_mb": 300.0,
            "valid_ppl_per_epoch": [valid * 1.5, valid], "oracle_ppl": 50.0 if corpus == "synthetic" else None,
            "device": "cpu", "git_commit": "abcdef1234567890", "versions": {"torch": "2.13.0"}, "config": config,
            "seed": seed, "stopped_by": "schedule", **extra}


@pytest.fixture
def storage_url(tmp_path):
    """Known trials: searched configurations (the best on validation must win), a failed trial, a tagger."""
    url = f"sqlite:///{tmp_path}/results.db"
    storage = open_storage(url)
    save_record(record("lstm", valid=120, test=125, tokens_per_second=2000.0), storage, "run-synthetic")
    save_record(record("lstm", valid=110, test=115, tokens_per_second=2000.0), storage, "run-synthetic")
    save_record(record("kn", valid=150, test=155, tokens_per_second=50000.0), storage, "run-synthetic")
    save_record(record("gru", valid=112, test=118, nn_kn_test_ppl=105.0), storage, "run-synthetic")
    optuna.load_study(study_name="run-synthetic", storage=storage).add_trial(
        optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    # same configuration in another study: best test perplexity, but worse on validation -> not kept
    save_record(record("lstm", valid=115, test=100), storage, "sweep-lstm")
    save_record(record("rnn-bptt", "ptb", valid=140, test=137, output="class", classes=100, minutes_per_epoch=2.0),
                storage, "train-rnn-bptt-ptb")
    save_record(record("rnn-bptt", "ptb", valid=150, test=120, output="class", classes=100), storage,
                "train-rnn-bptt-ptb")
    save_record(record("rnn-bptt", "ptb", valid=128, test=130, nn_kn_test_ppl=110.0, test_seconds=5.0), storage,
                "train-rnn-bptt-ptb")
    tagger = {"model": "birnn", "corpus": "conll2000", "parameters": 999, "device": "cpu"}
    save_record({**tagger, "config": {"lr": 0.01}, "valid_f1": 0.91, "test_f1": 0.90, "test_precision": 0.92,
                 "test_recall": 0.88}, storage, "train-birnn-conll2000", metric="valid_f1")
    save_record({**tagger, "config": {"lr": 0.02}, "valid_f1": 0.85, "test_f1": 0.95, "test_precision": 0.95,
                 "test_recall": 0.95}, storage, "train-birnn-conll2000", metric="valid_f1")
    optuna.create_study(study_name="empty", storage=storage)
    return url


def test_best_run_per_configuration_is_chosen_on_validation(storage_url):
    runs = load_runs(storage_url)
    assert len(runs) == 10  # every COMPLETE trial, the failed one left out
    best = best_per_configuration(runs)
    kept = {(r.model, r.corpus, r.output, None if pd.isna(r.classes) else int(r.classes)): r.test_ppl
            for r in best[best["task"] == "lm"].itertuples()}
    assert kept == {("gru", "synthetic", "full", None): 118, ("kn", "synthetic", "full", None): 155,
                    ("lstm", "synthetic", "full", None): 115, ("rnn-bptt", "ptb", "class", 100): 137,
                    ("rnn-bptt", "ptb", "full", None): 130}
    tagger = best[best["task"] == "tagging"]
    assert tagger["test_f1"].tolist() == [0.90]  # valid F1 0.91 beats 0.85, whatever the test F1
    assert set(best_per_configuration(load_runs(storage_url, ["train-rnn-bptt-ptb"]))["corpus"]) == {"ptb"}


def test_taggers_of_another_depth_cell_or_direction_are_other_configurations(tmp_path):
    storage = open_storage(url := f"sqlite:///{tmp_path}/taggers.db")
    for cell, layers, bidirectional, valid_f1 in [("elman", 1, True, 0.90), ("elman", 2, True, 0.91),
                                                  ("elman", 2, True, 0.89), ("lstm", 2, True, 0.92),
                                                  ("lstm", 2, False, 0.70)]:
        config = {"model": "birnn", "cell": cell, "layers": layers, "bidirectional": bidirectional, "lr": valid_f1}
        save_record({"model": "birnn", "corpus": "conll2000", "valid_f1": valid_f1, "test_f1": valid_f1,
                     "config": config}, storage, "depth", metric="valid_f1")
    best = best_per_configuration(load_runs(url))
    assert sorted(best["valid_f1"]) == [0.70, 0.90, 0.91, 0.92]  # elman 2x: the better of its two runs
    table = make_report(url, None, tmp_path / "out", use_wandb=False)["taggers"]
    assert sorted(zip(table["cell"], table["layers"], table["direction"])) == [
        ("elman", 1, "both"), ("elman", 2, "both"), ("lstm", 2, "both"), ("lstm", 2, "left to right")]


def test_table2_lines_up_with_the_paper(storage_url):
    table = table2(best_per_configuration(load_runs(storage_url))).set_index("model")
    assert list(table.index) == ["KN5", "feed-forward", "RNN-BP", "RNN-BPTT", "GRU", "LSTM"]
    assert list(table.columns) == ["ptb output", "ptb epochs", "ptb stopped by", "ptb seeds", "ptb NN", "ptb paper NN",
                                   "ptb diff NN", "ptb NN+KN", "ptb paper NN+KN", "ptb diff NN+KN", "synthetic output",
                                   "synthetic epochs", "synthetic stopped by", "synthetic seeds", "synthetic NN",
                                   "synthetic NN+KN"]
    bptt = table.loc["RNN-BPTT"]
    assert (bptt["ptb NN"], bptt["ptb paper NN"], bptt["ptb diff NN"]) == (130, 123, 7)
    assert (bptt["ptb NN+KN"], bptt["ptb paper NN+KN"], bptt["ptb diff NN+KN"]) == (110, 106, 4)
    assert table.loc["KN5", "ptb paper NN"] == 141.2 and math.isnan(table.loc["KN5", "ptb NN"])
    assert table.loc["LSTM", "ptb paper NN"] == 114.5
    assert table.loc["LSTM", "synthetic NN"] == 115 and table.loc["GRU", "synthetic NN+KN"] == 105
    assert table[["synthetic NN"]].notna().sum().item() == 3  # kn, gru, lstm ran on synthetic
    assert "1 run · commit abcdef1234 (1) · device cpu (1)" in table2(best_per_configuration(
        load_runs(storage_url, ["train-rnn-bptt-ptb"]))).attrs["provenance"]


def test_table3_classes_against_the_paper(storage_url):
    table = table3(best_per_configuration(load_runs(storage_url)))
    assert table["classes"].tolist() == ["100", "full"]
    assert table["test ppl"].tolist() == [137, 130]
    assert table["paper test ppl"].tolist() == [136, 123] and table["diff test ppl"].tolist() == [1, 7]
    assert table["paper min/epoch"].tolist() == [9.1, 154] and table["paper test s"].tolist() == [5.6, 212]
    assert table["diff test s"].tolist() == pytest.approx([2.0 - 5.6, 5.0 - 212])


def test_seeds_of_a_setting_are_one_row_with_mean_sd_and_count(tmp_path):
    storage = open_storage(url := f"sqlite:///{tmp_path}/seeds.db")
    for seed, test in enumerate([140.0, 142.0, 147.0]):
        save_record(record("rnn-bptt", "ptb", valid=150 + seed, test=test, output="class", classes=100, lr=10.0,
                           seed=seed), storage, "table3")
    save_record(record("rnn-bptt", "ptb", valid=155, test=999.0, output="class", classes=100, lr=10.0, seed=2),
                storage, "again")  # seed 2 run once more: the latest run of a seed counts, once
    save_record(record("rnn-bptt", "ptb", valid=140, test=139.0, output="class", classes=100, lr=30.0), storage,
                "table3")  # better on validation, but one seed of another setting: the 3-seed setting loses
    table = table3(best_per_configuration(load_runs(url)))
    assert table["test ppl"].tolist() == [139.0]
    storage = open_storage(url := f"sqlite:///{tmp_path}/three.db")
    for seed, test in enumerate([140.0, 142.0, 147.0]):
        save_record(record("rnn-bptt", "ptb", valid=150, test=test, output="class", classes=100, lr=10.0, seed=seed),
                    storage, "table3")
    row = table3(best_per_configuration(load_runs(url))).iloc[0]
    assert (row["seeds"], row["test ppl"]) == (3, 143.0)
    assert row["test ppl sd"] == pytest.approx(((3**2 + 1 + 4**2) / 2) ** 0.5)
    assert row["diff test ppl"] == pytest.approx(143.0 - 136)
    markdown_row = [line for line in make_report(url, None, tmp_path / "out", use_wandb=False) and
                    (tmp_path / "out" / "README.md").read_text().splitlines() if line.startswith("| ptb | 100")]
    assert "143.00 ± 3.61" in markdown_row[0]


def test_a_budget_that_did_not_stop_a_run_is_no_part_of_its_setting(tmp_path):
    storage = open_storage(url := f"sqlite:///{tmp_path}/budgets.db")

    def run(seed, test, minutes, stopped_by="schedule"):
        rec = record("rnn-bptt", "ptb", valid=150, test=test, output="class", classes=100, lr=10.0, seed=seed,
                     stopped_by=stopped_by)
        save_record({**rec, "config": {**rec["config"], "max_minutes": minutes}}, storage, f"s{seed}")

    run(0, 138.0, 60.0)  # a tuning trial's budget
    run(1, 140.0, 1440.0)  # the recipe trained again, with the default budget
    run(2, 145.0, 1440.0)
    table = table3(best_per_configuration(load_runs(url)))
    assert (table.iloc[0]["seeds"], table.iloc[0]["test ppl"]) == (3, 141.0)
    assert table.attrs["provenance"].startswith("3 runs ")  # every seed's run, not one a setting
    run(3, 300.0, 60.0, stopped_by="max_minutes")  # cut by its budget: a setting of its own, and it loses
    row = table3(best_per_configuration(load_runs(url))).iloc[0]
    assert (row["seeds"], row["test ppl"]) == (3, 141.0)
    assert len(load_runs(url)["setting"].unique()) == 2


def test_a_run_cut_short_is_marked_has_no_difference_to_the_paper_and_loses_to_a_finished_one(tmp_path):
    storage = open_storage(url := f"sqlite:///{tmp_path}/cut.db")
    save_record(record("rnn-bptt", "ptb", valid=300, test=290.0, epochs=1, stopped_by="max_epochs"), storage, "t")
    table = table2(best_per_configuration(load_runs(url))).set_index("model").loc["RNN-BPTT"]
    assert table["ptb NN"] == 290 and math.isnan(table["ptb diff NN"])
    assert table["ptb stopped by"] == "cut short: max_epochs" and table["ptb epochs"] == 1
    save_record(record("rnn-bptt", "ptb", valid=310, test=295.0, epochs=20, stopped_by="schedule"), storage, "t")
    table = table2(best_per_configuration(load_runs(url))).set_index("model").loc["RNN-BPTT"]
    assert (table["ptb NN"], table["ptb diff NN"], table["ptb stopped by"]) == (295, 295 - 123, "its schedule")
    lstm = record("lstm", "ptb", valid=120, test=116.0, epochs=13, stopped_by="max_epochs")
    save_record({**lstm, "config": {**lstm["config"], "schedule": "zaremba"}}, storage, "t")
    assert table2(best_per_configuration(load_runs(url))).set_index("model").loc["LSTM", "ptb diff NN"] == 1.5


def test_pareto_front_keeps_the_points_nothing_beats():
    speed = [100, 200, 300, 300, 50, 400]
    perplexity = [90, 100, 95, 120, 80, 130]
    assert pareto_front(speed, perplexity).tolist() == [True, False, True, False, True, True]


def test_report_files(storage_url, tmp_path, capsys):
    out = tmp_path / "report"
    tables = make_report(storage_url, None, out, use_wandb=False)
    assert set(tables) == {"leaderboard", "taggers", "table2", "table3"}
    for name in ("README.md", "index.html", "leaderboard.csv", "taggers.csv", "table2.csv", "table3.csv",
                 "speed.png", "classes.png", "epochs.png"):
        assert (out / name).stat().st_size > 0, name
    board = pd.read_csv(out / "leaderboard.csv", comment="#")
    assert board["test ppl (NN)"].tolist() == [130, 137, 115, 118, 155]  # by corpus, then perplexity
    assert board["oracle ppl"].isna().tolist() == [True, True, False, False, False]
    assert pd.read_csv(out / "taggers.csv", comment="#")["test F1"].tolist() == [0.90]
    readme = (out / "README.md").read_text()
    assert "| RNN-BPTT | full | — | its schedule | 1 | 130.00 | 123.00 | +7.00 | 110.00 | 106.00 | +4.00 |" in readme
    assert "runs: 1 runs" not in readme and "commit abcdef1234" in readme and "![" in readme
    first_lines = (out / "table3.csv").read_text().splitlines()[:3]
    assert first_lines[1].startswith("# runs: 2 runs · commit abcdef1234 (2) · device cpu (2) · torch 2.13.0")
    assert first_lines[2].startswith("# report generated ")
    assert "report of 6 configurations written to" in capsys.readouterr().out
    taggers_only = make_report(storage_url, ["train-birnn-conll2000"], out, use_wandb=False)
    assert set(taggers_only) == {"taggers"} and not (out / "table2.csv").exists()  # the old files are gone


def test_readme_block_gets_tables_2_and_3_and_a_readme_without_one_exits_2_before_writing(storage_url, tmp_path,
                                                                                          capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# Project\n\n<!-- bench report --readme: start -->\nold numbers\n"
                      "<!-- bench report --readme: end -->\n\nThe rest.\n")
    assert main(["report", "--storage", storage_url, "--out", str(tmp_path / "out"), "--no-wandb",
                 "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# Project\n\n<!-- bench report --readme: start -->\n**Table 2: ")
    assert text.endswith("<!-- bench report --readme: end -->\n\nThe rest.\n") and "old numbers" not in text
    assert "| RNN-BPTT | full | — | its schedule | 1 | 130.00 | 123.00 | +7.00 | 110.00 | 106.00 | +4.00 |" in text
    assert "| ptb | 100 | — | its schedule | 1 | 137.00 | 136.00 | +1.00 |" in text
    assert "report generated" not in text  # no date: the block changes only when the results do
    readme.write_text("# Project without the block\n")
    out = tmp_path / "none"
    assert main(["report", "--storage", storage_url, "--out", str(out), "--no-wandb", "--readme", str(readme)]) == 2
    err = capsys.readouterr().err
    assert f"--readme {readme}: no block between the lines" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and readme.read_text() == "# Project without the block\n"


def test_the_committed_ptb_report_and_readme_tables_are_the_committed_results_store(tmp_path):
    """reports/ptb's CSVs and the README's Tables 2 and 3 are what `bench report` makes of the committed
    reports/ptb/results.journal (apart from the generated-at line): regenerate them after adding runs."""
    repo = Path(__file__).resolve().parent.parent
    tables = make_report(f"journal:{repo / 'reports/ptb/results.journal'}", None, tmp_path, use_wandb=False)
    committed = sorted(path.name for path in (repo / "reports/ptb").glob("*.csv"))
    assert sorted(path.name for path in tmp_path.glob("*.csv")) == committed

    def lines(path):
        return [line for line in path.read_text().splitlines() if not line.startswith("# report generated")]

    for name in committed:
        assert lines(tmp_path / name) == lines(repo / "reports/ptb" / name), name
    start, end = README_BLOCK
    readme = (repo / "README.md").read_text()
    assert readme[readme.index(start) + len(start):readme.index(end)].strip() == paper_tables_markdown(tables)


@pytest.mark.skipif(not shutil.which("chromium"), reason="chromium is not installed (apt-get install -y chromium)")
def test_html_loads_in_headless_chromium_without_errors(storage_url, tmp_path):
    out = tmp_path / "report"
    make_report(storage_url, None, out, use_wandb=False)
    page = (out / "index.html").read_text()
    # a copy that clicks the leaderboard's "test ppl (NN)" header twice (descending) and notes the model order
    click = ("<script>const th = [...document.querySelectorAll('table.report')[0].tHead.rows[0].cells]"
             ".find(c => c.textContent === 'test ppl (NN)'); th.click(); th.click();"
             "document.body.dataset.order = [...document.querySelectorAll('table.report')[0].tBodies[0].rows]"
             ".map(r => r.cells[0].textContent).join(' ');</script></body>")
    (out / "clicked.html").write_text(page.replace("</body>", click))
    for name in ("index.html", "clicked.html"):
        done = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                               "--v=0", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                               (out / name).as_uri()], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "Uncaught" not in done.stderr and "SyntaxError" not in done.stderr
        assert len(re.findall(r'<table class="[^"]*\bsortable\b', done.stdout)) == 4  # the sort script ran
        assert done.stdout.count("data:image/png;base64,") == 3
    assert 'data-order="kn rnn-bptt rnn-bptt gru lstm"' in done.stdout  # 155, 137, 130, 118, 115


@pytest.mark.parametrize("argv,message", [
    (["--study", "empty"], "no completed runs in empty"),
    (["--study", "nosuch"], "no study 'nosuch' in sqlite:///"),
])
def test_empty_or_missing_study_exits_2_with_one_line(storage_url, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(["report", "--storage", storage_url, "--out", str(out), "--no-wandb", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not out.exists()
    missing = tmp_path / "missing.db"
    assert main(["report", "--storage", f"sqlite:///{missing}", "--out", str(out)]) == 2
    assert "no results database at" in capsys.readouterr().err and not missing.exists()


def test_wandb_offline_logs_the_tables_and_defers_the_report(storage_url, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # whatever an earlier test of the session left there
    assert main(["report", "--storage", storage_url, "--out", "out", "--study", "train-rnn-bptt-ptb"]) == 0
    printed = capsys.readouterr().out
    assert "the W&B Report will be created on the next online `bench report`" in printed
    assert "W&B logging failed" not in printed
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_wandb_report_holds_the_tables_and_the_speed_scatter():
    pytest.importorskip("wandb_workspaces", reason="the `reports` extra (wandb-workspaces) is not installed")
    report = build_wandb_report("bench", "someone", "abc123", ["leaderboard", "table2"], "studies: run-synthetic")
    grid = report.blocks[-1]
    assert grid.runsets[0].project == "bench" and "abc123" in str(grid.runsets[0].filters)
    assert [type(p).__name__ for p in grid.panels] == ["CustomChart", "WeavePanelSummaryTable",
                                                       "WeavePanelSummaryTable"]
    assert grid.panels[0].chart_fields == {"x": "train tokens/s", "y": "test ppl (NN)"}
    assert [p.table_name for p in grid.panels[1:]] == ["leaderboard", "table2"]
