"""The report's plots as PNG files: perplexity vs speed, Table 3's classes, validation curves by epoch and by
wall-clock time. The only module of the reports that draws (matplotlib)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # a bare Figure draws with the Agg canvas: no GUI backend, no pyplot state
from matplotlib.ticker import FuncFormatter, MaxNLocator

from bench.papers import PAPER_TABLE3, TABLE2_ROWS, corpora_ptb_first
from bench.records import write_atomically

SPEED, PERPLEXITY = "train tokens/s", "test ppl (NN)"  # leaderboard columns of the speed plot


def draw_plots(best: pd.DataFrame, tables: dict[str, pd.DataFrame], out: Path) -> dict[str, Path]:
    """The plots of `best` and its report's `tables` drawn into `out`, by title; those with nothing to show
    left out."""
    return {name: path for name, path in {
        "Perplexity vs training speed": plot_speed(tables.get("leaderboard", pd.DataFrame()), out / "speed.png"),
        "Classes vs perplexity and speed": plot_classes(tables.get("table3", pd.DataFrame()), out / "classes.png"),
        "Validation perplexity per epoch": plot_epochs(best, out / "epochs.png"),
        "Validation perplexity against wall-clock minutes": plot_wall_clock(best, tables, out / "wall_clock.png"),
    }.items() if path is not None}


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
    corpora = corpora_ptb_first(points)
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
        ax.margins(x=0.15, y=0.08)  # room for the labels of the outermost points
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    save(figure, path)
    return path


def plot_classes(table: pd.DataFrame, path: Path) -> Path | None:
    """Table 3 as curves, one row of panels per corpus: perplexity and minutes/epoch against the class count
    (the full softmax as a dashed line; on PTB the paper's beside ours); none without a class-based run."""
    corpora = [c for c in corpora_ptb_first(table) if (table.loc[table["corpus"] == c, "classes"] != "full").any()] \
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
    save(figure, path)
    return path


def run_label(run) -> str:
    return run["model"] + (f" c{run['classes']:.0f}" if run["output"] == "class" else "")


def plot_epochs(best: pd.DataFrame, path: Path) -> Path | None:
    """Validation perplexity after each epoch, one line per language-model run, one panel per corpus."""
    runs = best[(best["task"] == "lm") & best["record"].map(lambda r: bool(r.get("valid_ppl_per_epoch")))]
    if runs.empty:
        return None
    corpora = corpora_ptb_first(runs)
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
    save(figure, path)
    return path


def plot_wall_clock(best: pd.DataFrame, tables: dict[str, pd.DataFrame], path: Path) -> Path | None:
    """Validation perplexity against wall-clock minutes (training and validation: the time to a target), one
    line per run, one panel per paper table (Table 2's models, Table 3's output layers) and corpus."""
    lm = best[(best["task"] == "lm") & best["record"].map(lambda r: bool(r.get("curve")))]
    panels = []
    for name, title, rows in (("table2", "Table 2", lm[lm["model"].isin(list(TABLE2_ROWS))]),
                              ("table3", "Table 3", lm[(lm["model"] == "rnn-bptt")])):
        if name in tables:
            panels += [(f"{title}, {corpus}", rows[rows["corpus"] == corpus]) for corpus in corpora_ptb_first(rows)]
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
    save(figure, path)
    return path


def save(figure: Figure, path: Path) -> None:
    """The figure as a PNG file, written whole or not at all."""
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=110)
    write_atomically(path, image.getbuffer())
