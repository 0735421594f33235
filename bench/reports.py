"""`bench report`: the results database as tables, plots, Markdown/HTML/CSV and a W&B report.

Reports read only the Optuna storage (bench.store): the COMPLETE trials of the chosen studies
(`study.trials_dataframe()`) and the run record each trial carries (`user_attrs["record"]`).

Seeds. Runs whose whole configuration but the seed is the same are one setting: the report shows their
mean, the standard deviation (columns "... sd") and their count ("seeds"); the validation curves are the
lowest seed's.

Best per configuration. A configuration is model + corpus + output layer (+ class count when the output
layer is class-based); for taggers model + corpus + cell, depth and direction (TAGGER_ARCHITECTURE), so a
depth or cell study keeps a row per architecture; everything else (learning rate, hidden size, ...) is what
a study searched.
Of the settings of one configuration, across all reported studies, the report keeps one that reached its
own stopping point if there is one (see `reached_stop`), then the lowest mean validation perplexity
(language models) or the highest validation F1 (taggers) -- never chosen on test figures; ties go to the
most recent run. A run cut short by a budget is marked ("stopped by") and gets no difference to the paper.

Besides the leaderboard it rebuilds Mikolov et al. 2011 (ICASSP), *Extensions of recurrent neural network
language model*: Table 2 (PTB test perplexity of each model alone and interpolated with KN5) and Table 3
(the class-based output layer: classes vs perplexity and speed), next to the paper's numbers on PTB.
"""

from __future__ import annotations

import base64
import html
import json
import os
import platform
from datetime import datetime
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from matplotlib.figure import Figure  # a bare Figure draws with the Agg canvas: no GUI backend, no pyplot state
from matplotlib.ticker import FuncFormatter, MaxNLocator

from bench.errors import BenchError
from bench.records import check_writable
from bench.redact import redact
from bench.store import DEFAULT_STORAGE, open_storage
from bench.tables import leaderboard, tagger_table
from bench.tracking import wandb_mode, wandb_settings

TAGGER_ARCHITECTURE = ("cell", "layers", "bidirectional")
CONFIGURATION = ["task", "model", "corpus", "output", "classes", *TAGGER_ARCHITECTURE]
TABLE2_ROWS = {"kn": "KN5", "ffnn": "feed-forward", "rnn-bp": "RNN-BP", "rnn-bptt": "RNN-BPTT", "gru": "GRU",
               "lstm": "LSTM"}
# Mikolov et al. 2011, Table 2: PTB test perplexity (NN alone, NN+KN5); LSTM 2x200 without dropout from
# Zaremba et al. 2014, *Recurrent neural network regularization*.
PAPER_TABLE2 = {"kn": (141.2, None), "ffnn": (141, 118), "rnn-bp": (137, 113), "rnn-bptt": (123, 106),
                "lstm": (114.5, None)}
# Mikolov et al. 2011, Table 3: PTB, RNN with 200 hidden units trained by BPTT (5 steps), by output classes.
PAPER_TABLE3 = pd.DataFrame({
    "classes": ["30", "50", "100", "200", "400", "1000", "2000", "4000", "6000", "8000", "full"],
    "test ppl": [134.0, 136, 136, 136, 134, 131, 128, 127, 127, 124, 123],
    "min/epoch": [12.8, 9.8, 9.1, 9.5, 10.9, 16.1, 25.3, 44.4, 70, 107, 154],
    "test s": [8.8, 6.7, 5.6, 6.0, 8.1, 15.7, 28.7, 57.8, 96.5, 148, 212],
})
SPEED, PERPLEXITY = "train tokens/s", "test ppl (NN)"  # leaderboard columns of the speed plot
# Record figures the tables read; a column of missing values where no run has them (e.g. taggers only).
FIGURES = ("epochs", "valid_ppl", "test_ppl", "nn_kn_test_ppl", "valid_f1", "test_f1", "tokens_per_second",
           "minutes_per_epoch", "test_seconds", "git_commit", "device", "stopped_by", "seed")
# Figures averaged over the seeds of a setting, each with its standard deviation "<figure>_sd".
SEED_FIGURES = ("valid_ppl", "test_ppl", "nn_kn_valid_ppl", "nn_kn_test_ppl", "valid_f1", "test_f1", "test_precision",
                "test_recall", "epochs", "tokens_per_second", "minutes_per_epoch", "wall_minutes", "test_seconds")
OUTPUTS = ("leaderboard.csv", "taggers.csv", "table2.csv", "table3.csv", "speed.png", "classes.png", "epochs.png",
           "wall_clock.png", "README.md", "index.html")


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
            record = trial.user_attrs_record
            if not isinstance(record, dict):
                continue
            config = record.get("config") or {}
            output = config.get("output", "")
            task = "tagging" if "test_f1" in record else "lm"
            rows.append({
                **{k: v for k, v in record.items() if np.isscalar(v) or v is None},
                "setting": setting(config), "reached_stop": reached_stop(record),
                **{key: config.get(key) if task == "tagging" else None for key in TAGGER_ARCHITECTURE},
                "task": task,
                "output": output, "classes": config.get("classes") if output == "class" else None,
                "study": name, "trial": trial.number, "completed": trial.datetime_complete, "record": record,
            })
    if not rows:
        raise BenchError(f"no completed runs in {', '.join(studies or known)} ({redact(url)})")
    frame = pd.DataFrame(rows)
    return frame.reindex(columns=[*frame.columns, *(c for c in FIGURES if c not in frame)])


def setting(config: dict) -> str:
    """The configuration but the seed (and the targets, which only watch the run): what seeds repeat."""
    return json.dumps({k: v for k, v in config.items() if k not in ("seed", "target_ppl")}, sort_keys=True)


def reached_stop(record: dict) -> bool:
    """Whether the run reached its own stopping point: its schedule ended it, or it ran all the epochs of a
    fixed-length recipe (schedule zaremba; the n-gram's one pass, no schedule at all)."""
    stopped = record.get("stopped_by")
    fixed_length = (record.get("config") or {}).get("schedule", "zaremba") == "zaremba"
    return stopped == "schedule" or (stopped == "max_epochs" and fixed_length)


def seeds_as_one(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per setting (see the module docstring): figures averaged over its seeds (a seed run more than
    once counts once, its latest run), with "<figure>_sd" and "seeds"; the record is the lowest seed's with
    those figures in it."""
    latest = runs.assign(_seed=runs["seed"].fillna(-1)).sort_values("completed", na_position="first")
    latest = latest.drop_duplicates(["setting", "_seed"], keep="last").drop(columns="_seed")
    rows = []
    for _, group in latest.groupby("setting", sort=False):
        group = group.sort_values("seed")
        row = group.iloc[0].copy()
        row["seeds"] = len(group)
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


def provenance(runs: pd.DataFrame) -> str:
    """Which commits, devices, library versions and dates produced `runs` (from their records)."""
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


def _corpora(runs: pd.DataFrame) -> list[str]:
    return sorted(runs["corpus"].unique(), key=lambda c: (c != "ptb", c))  # PTB, the paper's corpus, first


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
    for corpus in _corpora(runs):
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


# ------------------------------------------------------------------------------------------------- plots


def pareto_front(speed, perplexity) -> np.ndarray:
    """Mask of the points no other point beats on both axes (at least as fast and lower perplexity)."""
    speed, perplexity = np.asarray(speed, dtype=float), np.asarray(perplexity, dtype=float)
    order = np.lexsort((perplexity, -speed))  # fastest first; at equal speed, lowest perplexity first
    best_so_far = np.concatenate([[np.inf], np.minimum.accumulate(perplexity[order])[:-1]])
    front = np.zeros(len(speed), dtype=bool)
    front[order] = perplexity[order] < best_so_far
    return front


def _axes_per_corpus(corpora: list[str], title: str) -> tuple[Figure, list]:
    figure = Figure(figsize=(5.5 * len(corpora), 4.2), layout="constrained")
    figure.suptitle(title)
    return figure, list(np.atleast_1d(figure.subplots(1, len(corpora), squeeze=False)[0]))


def plot_speed(board: pd.DataFrame, path: Path) -> Path | None:
    """Test perplexity against training tokens/s per corpus, the Pareto front (faster or better) marked."""
    if not {SPEED, PERPLEXITY} <= set(board.columns):
        return None
    points = board.replace([np.inf, -np.inf], np.nan).dropna(subset=[SPEED, PERPLEXITY])
    if points.empty:
        return None
    corpora = _corpora(points)
    figure, axes = _axes_per_corpus(corpora, "Perplexity vs training speed (Pareto front marked)")
    for ax, corpus in zip(axes, corpora):
        runs = points[points["corpus"] == corpus]
        front = pareto_front(runs[SPEED], runs[PERPLEXITY])
        ax.scatter(runs[SPEED], runs[PERPLEXITY], color="tab:blue", label="runs")
        edge = runs[front].sort_values(SPEED)
        ax.step(edge[SPEED], edge[PERPLEXITY], where="post", color="tab:red", label="Pareto front")
        ax.scatter(edge[SPEED], edge[PERPLEXITY], s=90, facecolors="none", edgecolors="tab:red")
        for _, run in runs.iterrows():
            label = run["model"] + (f" c{run['classes']}" if run.get("output") == "class" else "")
            ax.annotate(label, (run[SPEED], run[PERPLEXITY]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(xscale="log", xlabel="training tokens/s", ylabel="test perplexity", title=corpus)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    figure.savefig(path, dpi=110)
    return path


def plot_classes(table: pd.DataFrame, path: Path) -> Path | None:
    """Table 3 as curves, one row of panels per corpus: perplexity and minutes/epoch against the class count
    (the full softmax as a dashed line; on PTB the paper's beside ours); none without a class-based run."""
    corpora = [c for c in _corpora(table) if (table.loc[table["corpus"] == c, "classes"] != "full").any()] \
        if not table.empty else []
    if not corpora:
        return None
    figure = Figure(figsize=(12, 3.8 * len(corpora)), layout="constrained")
    figure.suptitle("RNN-BPTT with a class-based output layer (Mikolov et al. 2011, Table 3)")
    for axes, corpus in zip(figure.subplots(len(corpora), 2, squeeze=False), corpora):
        curves = [("ours", table[table["corpus"] == corpus])] + ([("paper", PAPER_TABLE3)] if corpus == "ptb" else [])
        for ax, column in zip(axes, ("test ppl", "min/epoch")):
            for label, rows in curves:
                classes = rows[rows["classes"] != "full"]
                line = ax.plot(classes["classes"].astype(float), classes[column], marker="o", label=label)[0]
                for value in rows.loc[rows["classes"] == "full", column]:
                    ax.axhline(value, linestyle="--", color=line.get_color(), label=f"{label}: full softmax")
            # minutes on a log axis: this machine's and the paper's differ ~50x, and both U shapes must show
            ax.set(xscale="log", yscale="log" if column == "min/epoch" else "linear", xlabel="classes",
                   ylabel=column, title=f"{corpus}: {column}")
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    figure.savefig(path, dpi=110)
    return path


def run_label(run) -> str:
    return run["model"] + (f" c{run['classes']:.0f}" if run["output"] == "class" else "")


def plot_epochs(best: pd.DataFrame, path: Path) -> Path | None:
    """Validation perplexity after each epoch, one line per language-model run, one panel per corpus."""
    runs = best[(best["task"] == "lm") & best["record"].map(lambda r: bool(r.get("valid_ppl_per_epoch")))]
    if runs.empty:
        return None
    corpora = _corpora(runs)
    figure, axes = _axes_per_corpus(corpora, "Validation perplexity per epoch")
    for ax, corpus in zip(axes, corpora):
        for _, run in runs[runs["corpus"] == corpus].iterrows():
            curve = run["record"]["valid_ppl_per_epoch"]
            ax.plot(range(1, len(curve) + 1), curve, marker="o", label=run_label(run))
        ax.set(xlabel="epoch", ylabel="validation perplexity", title=corpus)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(ax.get_xticks()) < 2:  # a single epoch: one tick, not matplotlib's fractional ones
            ax.set_xticks([1])
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    figure.savefig(path, dpi=110)
    return path


def plot_wall_clock(best: pd.DataFrame, tables: dict[str, pd.DataFrame], path: Path) -> Path | None:
    """Validation perplexity against wall-clock minutes (training and validation: the time to a target), one
    line per run, one panel per paper table (Table 2's models, Table 3's output layers) and corpus."""
    lm = best[(best["task"] == "lm") & best["record"].map(lambda r: bool(r.get("curve")))]
    panels = []
    for name, title, rows in (("table2", "Table 2", lm[lm["model"].isin(list(TABLE2_ROWS))]),
                              ("table3", "Table 3", lm[(lm["model"] == "rnn-bptt")])):
        if name in tables:
            panels += [(f"{title}, {corpus}", rows[rows["corpus"] == corpus]) for corpus in _corpora(rows)]
    panels = [(title, rows) for title, rows in panels if len(rows)]
    if not panels:
        return None
    figure = Figure(figsize=(12, 4.2 * len(panels)), layout="constrained")
    figure.suptitle("Validation perplexity against wall-clock minutes (training + validation)")
    for ax, (title, rows) in zip(figure.subplots(len(panels), 1, squeeze=False)[:, 0], panels):
        for _, run in rows.iterrows():
            curve = run["record"]["curve"]
            ax.plot([p["wall_minutes"] for p in curve], [p["val_ppl"] for p in curve], marker=".", label=run_label(run))
        ax.set(xscale="log", yscale="log", xlabel="wall minutes", ylabel="validation perplexity", title=title)
        plain = FuncFormatter(lambda value, _: f"{value:g}")  # 200 and 300 on a log axis, not 2 x 10^2
        ax.xaxis.set_major_formatter(plain)
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)  # perplexities span less than a decade: label the minor ticks
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    figure.savefig(path, dpi=110)
    return path


# ----------------------------------------------------------------------------------------------- writing


def formatted(table: pd.DataFrame) -> pd.DataFrame:
    """Cells as text: thousands separators, 2 decimals, signed differences, "—" where there is no figure; a
    figure with a standard deviation column ("<column> sd") as "mean ± sd"."""
    def missing(value) -> bool:
        return value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))

    def cell(column: str, value) -> str:
        if missing(value):
            return "—"
        if isinstance(value, (int, np.integer)) or column in ("params", "seeds") or column.endswith(" seeds"):
            return f"{value:,.0f}"
        if isinstance(value, (float, np.floating)):
            if column.endswith("epochs") and float(value).is_integer():
                return f"{value:.0f}"
            return f"{value:+,.2f}" if "diff" in column else f"{value:,.2f}" if abs(value) < 1e5 else f"{value:,.0f}"
        return str(value)

    cells = {}
    for column in table.columns:
        if column.endswith(" sd") and column.removesuffix(" sd") in table:
            continue
        cells[column] = [cell(column, v) for v in table[column]]
        if f"{column} sd" in table:
            cells[column] = [text if missing(sd) else f"{text} ± {sd:.2f}"
                             for text, sd in zip(cells[column], table[f"{column} sd"])]
    return pd.DataFrame(cells, index=table.index)


def markdown(table: pd.DataFrame) -> str:
    text = formatted(table)
    numeric = [pd.api.types.is_numeric_dtype(table[c]) for c in text.columns]
    lines = ["| " + " | ".join(text.columns) + " |", "| " + " | ".join("---:" if n else "---" for n in numeric) + " |"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in text.itertuples(index=False))])


SORT_SCRIPT = """
// Click a column header to sort its table (numbers by value, "—" last); marks tables it made sortable.
for (const table of document.querySelectorAll("table.report")) {
  table.classList.add("sortable");
  const heads = Array.from(table.tHead.rows[0].cells);
  heads.forEach((head, column) => head.addEventListener("click", () => {
    const ascending = head.getAttribute("aria-sort") !== "ascending";
    heads.forEach(h => h.removeAttribute("aria-sort"));
    head.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    const key = row => {
      const text = row.cells[column].textContent.trim();
      const number = parseFloat(text.replace(/[,+]/g, ""));
      return isNaN(number) ? [1, text] : [0, number];
    };
    const rows = Array.from(table.tBodies[0].rows).sort((a, b) => {
      const [x, y] = [key(a), key(b)];
      const order = x[0] - y[0] || (x[1] < y[1] ? -1 : x[1] > y[1] ? 1 : 0);
      return ascending ? order : -order;
    });
    rows.forEach(row => table.tBodies[0].appendChild(row));
  }));
}
"""
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; padding: 0 1em; color: #222; }
table.report { border-collapse: collapse; margin: .5em 0 1em; font-size: 13px; }
table.report th, table.report td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
table.report td:first-child, table.report th:first-child { text-align: left; }
table.report th { background: #f0f3f7; cursor: pointer; user-select: none; }
table.report th[aria-sort=ascending]::after { content: " ▲"; }
table.report th[aria-sort=descending]::after { content: " ▼"; }
table.report tbody tr:nth-child(even) { background: #fafafa; }
p.meta { color: #666; font-size: 12px; margin: .2em 0; }
img { max-width: 100%; border: 1px solid #eee; }
"""


def write_report(best: pd.DataFrame, out: Path) -> tuple[dict[str, pd.DataFrame], dict[str, Path]]:
    """Write the tables (CSV), plots (PNG), README.md and index.html of `best` into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # a previous report's files must not survive as if this one wrote them
        (out / name).unlink(missing_ok=True)
    board = leaderboard_table(best)
    tables = {"leaderboard": board, "taggers": taggers_table(best), "table2": table2(best), "table3": table3(best)}
    # Table 2 always has its six model rows: it is worth showing once a corpus column holds a figure
    tables = {name: table for name, table in tables.items() if len(table) and len(table.columns) > (name == "table2")}
    titles = {"leaderboard": "Leaderboard (language models, best run per configuration)",
              "taggers": "Taggers (best run per configuration)",
              "table2": "Table 2: test perplexity, NN alone and NN+KN5 (paper: Mikolov et al. 2011, PTB; "
                        "LSTM: Zaremba et al. 2014)",
              "table3": "Table 3: RNN-BPTT, classes vs perplexity and speed (paper: Mikolov et al. 2011, PTB)"}
    stamp = generated_by()
    for name, table in tables.items():
        with open(out / f"{name}.csv", "w") as handle:  # provenance as comment lines: read_csv(..., comment="#")
            handle.write(f"# {titles[name]}\n# runs: {table.attrs['provenance']}\n# {stamp}\n")
            table.to_csv(handle, index=False)
    figures = {name: path for name, path in {
        "Perplexity vs training speed": plot_speed(board, out / "speed.png"),
        "Classes vs perplexity and speed": plot_classes(tables.get("table3", pd.DataFrame()), out / "classes.png"),
        "Validation perplexity per epoch": plot_epochs(best, out / "epochs.png"),
        "Validation perplexity against wall-clock minutes": plot_wall_clock(best, tables, out / "wall_clock.png"),
    }.items() if path is not None}

    md = [f"# bench report\n\n{stamp}; studies: {', '.join(sorted(best['study'].unique()))}.\n"]
    page = [f"<h1>bench report</h1><p class='meta'>{html.escape(stamp)}; studies: "
            f"{html.escape(', '.join(sorted(best['study'].unique())))}. Click a column header to sort.</p>"]
    for name, table in tables.items():
        meta = f"Runs: {table.attrs['provenance']}. {stamp[0].upper()}{stamp[1:]}. CSV: {name}.csv"
        md.append(f"## {titles[name]}\n\n{markdown(table)}\n\n{meta}\n")
        page.append(f"<h2>{html.escape(titles[name])}</h2>"
                    + formatted(table).to_html(index=False, classes="report", border=0)
                    + f"<p class='meta'>{html.escape(meta)}</p>")
    for title, path in figures.items():
        md.append(f"## {title}\n\n![{title}]({path.name})\n")
        encoded = base64.b64encode(path.read_bytes()).decode()
        page.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
                    f"src='data:image/png;base64,{encoded}'>")
    (out / "README.md").write_text("\n".join(md))
    (out / "index.html").write_text(
        f"<!doctype html>\n<html lang='en'><head><meta charset='utf-8'><title>bench report</title>"
        f"<style>{STYLE}</style></head>\n<body>\n{chr(10).join(page)}\n<script>{SORT_SCRIPT}</script>\n</body></html>\n")
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
    settings = wandb_settings()
    try:
        run = wandb.init(project=project, job_type="report", mode=mode, settings=settings,
                         config={"studies": studies})
    except Exception as error:  # online but unreachable: keep the run locally for `wandb sync`
        print(f"W&B unreachable ({str(error).splitlines()[0]}); logging offline instead")
        mode, run = "offline", wandb.init(project=project, job_type="report", mode="offline", settings=settings,
                                          config={"studies": studies})
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
                use_wandb: bool = True) -> dict[str, pd.DataFrame]:
    """`bench report`: read the studies, keep the best run per configuration, write `out`, log to W&B."""
    best = best_per_configuration(load_runs(storage_url, studies))  # a bad storage or study: nothing written
    check_writable(out)
    try:
        tables, figures = write_report(best, out)
    except OSError as error:  # the disk filled, or the folder was taken away meanwhile
        raise BenchError(f"cannot write the report into {out}: {error.strerror or error}") from None
    print(f"report of {len(best)} configurations written to {out}: "
          f"{', '.join(sorted(p.name for p in out.iterdir() if p.is_file()))}")
    if use_wandb:
        try:
            log_to_wandb(tables, figures, sorted(best["study"].unique()),
                         project or os.environ.get("WANDB_PROJECT") or "bench")
        except Exception as error:  # the files are written; W&B trouble is reported, not fatal
            print(f"W&B logging failed: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
    return tables
