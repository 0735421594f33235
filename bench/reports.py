"""`bench report`: the results database as tables, plots, Markdown/HTML/CSV and a W&B report.

Reports read only the Optuna storage (bench.store): the COMPLETE trials of the chosen studies
(`study.trials_dataframe()`) and the run record each trial carries (`user_attrs["record"]`).

Seeds. Runs whose whole configuration but the seed is the same are one setting: the report shows their
mean, the standard deviation (columns "... sd") and their count ("seeds"); the validation curves are the
lowest seed's. A wall-clock budget that did not cut a run short is no part of its setting: a tuning
trial (60 minutes) and a later `bench train` of its recipe (24 hours) that both reached their stopping
point are seeds of one setting.

Best per configuration. A configuration is model + corpus + output layer (+ class count when the output
layer is class-based); for taggers model + corpus + cell, depth and direction (TAGGER_ARCHITECTURE), so a
depth or cell study keeps a row per architecture; everything else (learning rate, hidden size, ...) is what
a study searched.
Of the settings of one configuration, across all reported studies, the report keeps one that reached its
own stopping point if there is one (see `reached_stop`), then the lowest mean validation perplexity
(language models) or the highest validation F1 (taggers) -- never chosen on test figures; ties go to the
most recent run. A run cut short by a budget is marked ("stopped by") and gets no difference to the paper.

Besides the leaderboard it rebuilds Mikolov et al. 2011, Tables 2 and 3, next to the paper's numbers on PTB
(bench.papers). The plots are drawn by bench.report_plots, the files written by bench.report_pages.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from bench.errors import BenchError
from bench.papers import PAPER_TABLE2, PAPER_TABLE3, TABLE2_ROWS, corpora_ptb_first
from bench.records import RunRecord, check_writable
from bench.redact import redact
from bench.report_pages import clear_previous_report, readme_around_block, write_pages, write_readme_block, write_tables
from bench.report_plots import PERPLEXITY, SPEED, draw_plots
from bench.store import DEFAULT_STORAGE, open_storage
from bench.tables import leaderboard, tagger_table
from bench.tasks import record_task
from bench.tracking import wandb_mode, wandb_settings

TAGGER_ARCHITECTURE = ("cell", "layers", "bidirectional")
CONFIGURATION = ["task", "model", "corpus", "output", "classes", *TAGGER_ARCHITECTURE]
# Record figures the tables read; a column of missing values where no run has them (e.g. taggers only).
FIGURES = ("epochs", "valid_ppl", "test_ppl", "nn_kn_test_ppl", "valid_f1", "test_f1", "tokens_per_second", "gflops",
           "minutes_per_epoch", "test_seconds", "git_commit", "device", "stopped_by", "seed")
# Figures averaged over the seeds of a setting, each with its standard deviation "<figure>_sd".
SEED_FIGURES = ("valid_ppl", "test_ppl", "nn_kn_valid_ppl", "nn_kn_test_ppl", "valid_f1", "test_f1", "test_precision",
                "test_recall", "epochs", "tokens_per_second", "gflops", "minutes_per_epoch", "wall_minutes",
                "test_seconds")


# ------------------------------------------------------------------------------------------------ reading


def load_runs(storage_url: str | None = None, studies: list[str] | None = None) -> pd.DataFrame:
    """One row per COMPLETE trial of `studies` (default: all): the record's figures, its configuration
    (CONFIGURATION columns), study, trial number, completion time, and the record itself (column "record")."""
    url = storage_url or DEFAULT_STORAGE
    storage = open_storage(url, create=False)
    known = optuna.get_all_study_names(storage)
    missing = [name for name in studies or [] if name not in known]
    if missing or not known:
        have = f"studies there: {', '.join(known)}" if known else "it holds no studies; run `bench run` first"
        raise BenchError(f"no study {', '.join(map(repr, missing))} in {redact(url)} ({have})" if missing
                         else f"no studies in {redact(url)}: run `bench run` or `bench train` first")
    rows = []
    for name in studies or known:
        trials = optuna.load_study(study_name=name, storage=storage).trials_dataframe(
            attrs=("number", "state", "datetime_complete", "user_attrs"))
        if "user_attrs_record" not in trials:
            continue
        for trial in trials[trials["state"] == "COMPLETE"].itertuples():
            if not isinstance(trial.user_attrs_record, dict):
                continue
            record = RunRecord.from_dict(trial.user_attrs_record).to_dict()
            config = record.get("config") or {}
            output = config.get("output", "")
            task = record_task(record).name
            rows.append({
                **{k: v for k, v in record.items() if np.isscalar(v) or v is None},
                "setting": setting(config, record.get("stopped_by")), "reached_stop": reached_stop(record),
                **{key: config.get(key) if task == "tagging" else None for key in TAGGER_ARCHITECTURE},
                "task": task,
                "output": output, "classes": config.get("classes") if output == "class" else None,
                "study": name, "trial": trial.number, "completed": trial.datetime_complete, "record": record,
            })
    if not rows:
        raise BenchError(f"no completed runs in {', '.join(studies or known)} ({redact(url)})")
    frame = pd.DataFrame(rows)
    return frame.reindex(columns=[*frame.columns, *(c for c in FIGURES if c not in frame)])


def setting(config: dict, stopped_by: str | None) -> str:
    """The configuration but the seed, the targets (which only watch the run) and a wall-clock budget that
    did not stop the run: what seeds repeat."""
    watching = ("seed", "target_ppl", *(() if stopped_by == "max_minutes" else ("max_minutes",)))
    return json.dumps({k: v for k, v in config.items() if k not in watching}, sort_keys=True)


def reached_stop(record: dict) -> bool:
    """Whether the run reached its own stopping point: its schedule ended it, or it ran all the epochs of a
    fixed-length recipe (schedule zaremba; the n-gram's one pass, no schedule at all)."""
    stopped = record.get("stopped_by")
    fixed_length = (record.get("config") or {}).get("schedule", "zaremba") == "zaremba"
    return stopped == "schedule" or (stopped == "max_epochs" and fixed_length)


def seeds_as_one(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per setting (see the module docstring): figures averaged over its seeds (a seed run more than
    once counts once, its latest run), with "<figure>_sd" and "seeds"; the record is the lowest seed's with
    those figures in it; "runs" holds the seeds' own rows, for provenance."""
    latest = runs.assign(_seed=runs["seed"].fillna(-1)).sort_values("completed", na_position="first")
    latest = latest.drop_duplicates(["setting", "_seed"], keep="last").drop(columns="_seed")
    rows = []
    for _, group in latest.groupby("setting", sort=False):
        group = group.sort_values("seed")
        row = group.iloc[0].copy()
        row["seeds"], row["runs"] = len(group), group
        row["record"] = {**row["record"], "seeds": len(group)}
        if len(group) > 1:
            figures = {}
            for figure in SEED_FIGURES:
                values = pd.to_numeric(group[figure], errors="coerce") if figure in group else pd.Series(dtype=float)
                if values.notna().any():
                    figures[figure], figures[f"{figure}_sd"] = values.mean(), values.std()
            for figure, value in figures.items():
                row[figure] = value
            row["reached_stop"] = bool(group["reached_stop"].all())
            row["completed"] = group["completed"].max()
            row["record"] = {**row["record"], **figures, "seeds": len(group)}
        rows.append(row)
    return pd.DataFrame(rows).reset_index(drop=True)


def best_per_configuration(runs: pd.DataFrame) -> pd.DataFrame:
    """The best setting of each configuration (see the module docstring), ordered by task, corpus, model."""
    settings = seeds_as_one(runs)
    score = settings["valid_ppl"].where(settings["task"] == "lm", -settings["valid_f1"])
    ranked = settings.assign(_cut=~settings["reached_stop"].astype(bool), _score=score).sort_values(
        ["_cut", "_score", "completed"], ascending=[True, True, False], na_position="last")
    best = ranked.drop_duplicates(CONFIGURATION).drop(columns=["_cut", "_score"])
    return best.sort_values(["task", "corpus", "model", "output", "classes"]).reset_index(drop=True)


# ------------------------------------------------------------------------------------------ provenance


def provenance(settings: pd.DataFrame) -> str:
    """Which commits, devices, library versions and dates produced the runs behind `settings`, every seed's
    run counted (from seeds_as_one's "runs" column)."""
    runs = pd.concat(list(settings["runs"]), ignore_index=True)
    commits, devices = runs["git_commit"].fillna("unknown").str[:10], runs["device"].fillna("unknown")
    versions = pd.DataFrame([r.get("versions") or {} for r in runs["record"]])
    libraries = ", ".join(f"{lib} {'/'.join(sorted(versions[lib].dropna().astype(str).unique()))}"
                          for lib in versions.columns)
    dates = pd.to_datetime(runs["completed"]).dropna()
    span = f"{dates.min():%Y-%m-%d %H:%M} – {dates.max():%Y-%m-%d %H:%M}" if len(dates) else "unknown"

    def counted(values: pd.Series) -> str:
        return ", ".join(f"{value} ({count})" for value, count in values.value_counts().items())

    return (f"{len(runs)} run{'s' * (len(runs) != 1)} · commit {counted(commits)} · device {counted(devices)} · "
            f"{libraries or 'versions unknown'} · completed {span}")


def generated_by() -> str:
    """The report's own date and machine."""
    machine = platform.processor() or platform.machine()
    return f"report generated {datetime.now().astimezone():%Y-%m-%d %H:%M %Z} on {platform.node()} ({machine})"


def _with_provenance(table: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    table.attrs["provenance"] = provenance(runs) if len(runs) else "no runs"
    return table


# ------------------------------------------------------------------------------------------------ tables


def leaderboard_table(best: pd.DataFrame) -> pd.DataFrame:
    """Language models: bench.tables.leaderboard of the best runs, by corpus then test perplexity."""
    runs = best[best["task"] == "lm"].sort_values(["corpus", "test_ppl"])
    return _with_provenance(leaderboard(list(runs["record"])), runs)


def taggers_table(best: pd.DataFrame) -> pd.DataFrame:
    """Taggers (records with test_f1): bench.tables.tagger_table, by corpus then test F1."""
    runs = best[best["task"] == "tagging"].sort_values(["corpus", "test_f1"], ascending=[True, False])
    return _with_provenance(tagger_table(list(runs["record"])), runs)




def stop_label(run) -> str:
    """The run's "stopped by" cell: its own stopping point, or the budget that cut it short (marked)."""
    if run["reached_stop"]:
        return "its schedule"
    stopped = run.get("stopped_by")
    return f"cut short: {stopped}" if isinstance(stopped, str) else "cut short: unknown"


def output_label(run) -> str:
    """The run's output layer: "full", "class 100", "adaptive"; empty for a model without one (KN)."""
    if not isinstance(run.get("output"), str):
        return ""
    return f"class {int(run['classes'])}" if run["output"] == "class" else run["output"]


def table2(best: pd.DataFrame) -> pd.DataFrame:
    """Mikolov et al. 2011, Table 2: test perplexity of each model alone (NN) and interpolated with KN5
    (NN+KN), per corpus, with each run's output layer, epochs and what stopped it; on PTB beside the paper's figures and
    the difference (ours - paper), left empty for a run cut short by a budget. Each cell is the model's best
    configuration on that corpus (lowest validation perplexity)."""
    lm = best[(best["task"] == "lm") & best["model"].isin(list(TABLE2_ROWS))]
    runs = lm.sort_values(["reached_stop", "valid_ppl"], ascending=[False, True]).drop_duplicates(["model", "corpus"])
    table = pd.DataFrame(index=pd.Index(list(TABLE2_ROWS.values()), name="model"))
    paper = pd.DataFrame(PAPER_TABLE2, index=["NN", "NN+KN"]).T.reindex(list(TABLE2_ROWS)).astype(float)
    for corpus in corpora_ptb_first(runs):
        measured = runs[runs["corpus"] == corpus].set_index("model").reindex(list(TABLE2_ROWS))
        table[f"{corpus} output"] = [output_label(run) for _, run in measured.iterrows()]
        table[f"{corpus} epochs"] = measured["epochs"].to_numpy(dtype=float)
        table[f"{corpus} stopped by"] = [stop_label(run) if isinstance(run["record"], dict) else ""
                                         for _, run in measured.iterrows()]
        table[f"{corpus} seeds"] = measured["seeds"].to_numpy(dtype=float)
        comparable = measured["reached_stop"].fillna(False).to_numpy(dtype=bool)
        for column, key in (("NN", "test_ppl"), ("NN+KN", "nn_kn_test_ppl")):
            ours = measured[key].to_numpy(dtype=float)
            table[f"{corpus} {column}"] = ours
            if f"{key}_sd" in measured and measured[f"{key}_sd"].notna().any():
                table[f"{corpus} {column} sd"] = measured[f"{key}_sd"].to_numpy(dtype=float)
            if corpus == "ptb":
                table[f"ptb paper {column}"] = paper[column].to_numpy()
                table[f"ptb diff {column}"] = np.where(comparable, ours - paper[column].to_numpy(), np.nan)
    return _with_provenance(table.reset_index(), runs)


def table3(best: pd.DataFrame) -> pd.DataFrame:
    """Mikolov et al. 2011, Table 3: RNN-BPTT with a class-based output layer, by class count (and the full
    softmax as "full"): test perplexity, epochs and what stopped the run, minutes per training epoch, seconds
    to score the test set; on PTB beside the paper's figures and the difference (ours - paper; the paper's
    times are from a 2011 CPU), the perplexity difference left empty for a run cut short by a budget."""
    runs = best[(best["task"] == "lm") & (best["model"] == "rnn-bptt") & best["output"].isin(["class", "full"])]
    table = pd.DataFrame({
        "corpus": runs["corpus"],
        "classes": [f"{c:.0f}" if output == "class" else "full" for c, output in zip(runs["classes"], runs["output"])],
        "epochs": runs["epochs"], "stopped by": [stop_label(run) for _, run in runs.iterrows()],
        "seeds": runs["seeds"], "test ppl": runs["test_ppl"],
        **({"test ppl sd": runs["test_ppl_sd"]} if "test_ppl_sd" in runs and runs["test_ppl_sd"].notna().any()
           else {}),
        "min/epoch": runs["minutes_per_epoch"], "test s": runs["test_seconds"], "_comparable": runs["reached_stop"],
    })
    order = table["classes"].map(lambda c: np.inf if c == "full" else float(c))
    table = table.assign(_order=order, _ptb=table["corpus"] != "ptb").sort_values(["_ptb", "corpus", "_order"])
    table = table.drop(columns=["_order", "_ptb"]).reset_index(drop=True)
    comparable = table.pop("_comparable").fillna(False).to_numpy(dtype=bool)
    if (table["corpus"] == "ptb").any():
        paper = table.merge(PAPER_TABLE3, on="classes", how="left", suffixes=("", " paper"))
        on_ptb = (table["corpus"] == "ptb").to_numpy()
        for column in ("test ppl", "min/epoch", "test s"):
            reference = paper[f"{column} paper"].where(on_ptb).to_numpy()
            position = table.columns.get_loc(column) + 1 + (column == "test ppl" and "test ppl sd" in table)
            difference = table[column].to_numpy(dtype=float) - reference
            table.insert(position, f"paper {column}", reference)
            table.insert(position + 1, f"diff {column}",
                         np.where(comparable, difference, np.nan) if column == "test ppl" else difference)
    return _with_provenance(table, runs)


# ----------------------------------------------------------------------------------------------- writing


def report_tables(best: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The tables of `best` that have something to show, by name."""
    tables = {"leaderboard": leaderboard_table(best), "taggers": taggers_table(best), "table2": table2(best),
              "table3": table3(best)}
    # Table 2 always has its six model rows: it is worth showing once a corpus column holds a figure
    return {name: table for name, table in tables.items() if len(table) and len(table.columns) > (name == "table2")}


def write_report(best: pd.DataFrame, out: Path) -> tuple[dict[str, pd.DataFrame], dict[str, Path]]:
    """Write the tables (CSV), plots (PNG), README.md and index.html of `best` into `out`."""
    clear_previous_report(out)
    tables = report_tables(best)
    stamp = generated_by()
    write_tables(tables, out, stamp)
    figures = draw_plots(best, tables, out)
    write_pages(tables, figures, sorted(best["study"].unique()), out, stamp)
    return tables, figures


# --------------------------------------------------------------------------------------------------- W&B


def _wandb_table(table: pd.DataFrame):
    import wandb

    # plain Python values (None for missing): W&B infers one type per column
    return wandb.Table(dataframe=table.astype(object).where(table.notna(), None))


def build_wandb_report(project: str, entity: str, run_id: str, tables: list[str], description: str):
    """A W&B Report (wandb-workspaces) over the report run: its tables, and perplexity against training
    speed of the studies' runs (the scatter chart logged as "perplexity_vs_speed")."""
    import wandb_workspaces.reports.v2 as wr

    runset = wr.Runset(entity=entity, project=project, name="bench report", filters=f"ID = '{run_id}'")
    scatter = wr.CustomChart(query={"summaryTable": {"tableKey": "perplexity_vs_speed_table"}},
                             chart_name="wandb/scatter/v0", chart_fields={"x": SPEED, "y": PERPLEXITY},
                             chart_strings={"title": "Perplexity vs training speed"})
    panels = [scatter, *(wr.WeavePanelSummaryTable(table_name=name) for name in tables)]
    return wr.Report(project=project, entity=entity, title="bench report", description=description,
                     blocks=[wr.P(description), wr.PanelGrid(runsets=[runset], panels=panels)])


def log_to_wandb(tables: dict[str, pd.DataFrame], figures: dict[str, Path], studies: list[str],
                 project: str) -> None:
    """Log the tables (wandb.Table), the speed scatter and the plots to a run of job type "report"; online,
    also create a W&B Report from them (needs the `reports` extra: wandb-workspaces) and print its URL."""
    import wandb

    mode = wandb_mode()
    if mode == "disabled":
        return
    # dir read per run, as the sweeps do: wandb's settings singleton keeps the first process-wide one
    init = dict(project=project, job_type="report", settings=wandb_settings(), config={"studies": studies},
                dir=os.environ.get("WANDB_DIR"))
    try:
        run = wandb.init(mode=mode, **init)
    except Exception as error:  # online but unreachable: keep the run locally for `wandb sync`
        print(f"W&B unreachable ({str(error).splitlines()[0]}); logging offline instead")
        mode, run = "offline", wandb.init(mode="offline", **init)
    with run:
        run.log({name: _wandb_table(table) for name, table in tables.items()})
        board = tables.get("leaderboard")
        if board is not None and {SPEED, PERPLEXITY} <= set(board.columns):
            points = _wandb_table(board[["model", "corpus", SPEED, PERPLEXITY]].dropna())
            run.log({"perplexity_vs_speed": wandb.plot.scatter(points, SPEED, PERPLEXITY,
                                                               title="Perplexity vs training speed")})
        run.log({title: wandb.Image(str(path)) for title, path in figures.items()})
        for name, table in tables.items():
            run.summary[f"{name}_provenance"] = table.attrs["provenance"]
    if mode == "offline":
        print(f"W&B: offline run saved in {Path(run.dir).parent} (`wandb sync` uploads it); "
              "the W&B Report will be created on the next online `bench report`")
        return
    print(f"W&B run: {run.url}")
    try:
        report = build_wandb_report(project, run.entity, run.id, list(tables), f"Studies: {', '.join(studies)}. "
                                    f"{generated_by()}.")
    except ImportError:
        print("W&B Report skipped: install the `reports` extra (pip install -e '.[reports]') to create it")
        return
    print(f"W&B Report: {report.save().url}")


def make_report(storage_url: str | None, studies: list[str] | None, out: Path, project: str | None = None,
                use_wandb: bool = True, readme: Path | None = None) -> dict[str, pd.DataFrame]:
    """`bench report`: read the studies, keep the best run per configuration, write `out` (and Tables 2 and 3
    into the marked block of `readme`), log to W&B."""
    best = best_per_configuration(load_runs(storage_url, studies))  # a bad storage or study: nothing written
    check_writable(out)
    around = readme_around_block(readme) if readme else None
    try:
        tables, figures = write_report(best, out)
    except OSError as error:  # the disk filled, or the folder was taken away meanwhile
        raise BenchError(f"cannot write the report into {out}: {error.strerror or error}") from None
    written = [*(f"{name}.csv" for name in tables), *(path.name for path in figures.values()), "README.md",
               "index.html"]
    print(f"report of {len(best)} configurations written to {out}: {', '.join(sorted(written))}")
    if readme:
        write_readme_block(tables, readme, around)
        print(f"Tables 2 and 3 written into {readme}")
    if use_wandb:
        try:
            log_to_wandb(tables, figures, sorted(best["study"].unique()),
                         project or os.environ.get("WANDB_PROJECT") or "bench")
        except Exception as error:  # the files are written; W&B trouble is reported, not fatal
            print(f"W&B logging failed: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
    return tables
