"""Run records as pandas tables: one row per run, the columns of Mikolov et al. 2011's Tables 2 and 3."""

from __future__ import annotations

import pandas as pd

from bench.tasks import TAGGER, record_task

TARGETS = "minutes_to_target"
COLUMNS = {
    "model": "model",
    "output": "output",
    "classes": "classes",
    "corpus": "corpus",
    "parameters": "params",
    "epochs": "epochs",
    "stopped_by": "stopped by",
    "seeds": "seeds",
    "valid_ppl": "valid ppl",
    "test_ppl": "test ppl (NN)",
    "test_ppl_sd": "test ppl (NN) sd",
    "nn_kn_test_ppl": "test ppl (NN+KN)",
    "nn_kn_test_ppl_sd": "test ppl (NN+KN) sd",
    "oracle_ppl": "oracle ppl",
    "unigram_ppl": "unigram ppl",
    "tokens_per_second": "train tokens/s",
    "gflops": "train GFLOP/s",
    "minutes_per_epoch": "min/epoch",
    "wall_minutes": "wall min",
    TARGETS: "",  # one column per target perplexity: "min to <target>" (minutes to that validation perplexity)
    "test_seconds": "test s",
    "peak_memory_mb": "peak MB",
}


# Tagger records (scored by F1 rather than perplexity) have their own table.
TAGGER_COLUMNS = {
    "model": "model",
    "corpus": "corpus",
    "cell": "cell",
    "layers": "layers",
    "direction": "direction",
    "parameters": "params",
    "epochs": "epochs",
    "stopped_by": "stopped by",
    "seeds": "seeds",
    "valid_f1": "valid F1",
    "test_f1": "test F1",
    "test_f1_sd": "test F1 sd",
    "test_precision": "test precision",
    "test_recall": "test recall",
    "tokens_per_second": "train tokens/s",
    "minutes_per_epoch": "min/epoch",
    "test_seconds": "test s",
    "peak_memory_mb": "peak MB",
}


def _table(records: list[dict], columns: dict) -> pd.DataFrame:
    rows = []
    for record in records:
        config = record.get("config") or {}
        classes = config.get("classes") if config.get("output") == "class" else None
        direction = {True: "both", False: "left to right"}.get(config.get("bidirectional"), "")
        targets = {f"min to {target}": minutes for target, minutes in (record.get(TARGETS) or {}).items()}
        rows.append({**record, "output": config.get("output", ""), "classes": "" if classes is None else str(classes),
                     "cell": config.get("cell", ""), "layers": config.get("layers", ""), "direction": direction,
                     **targets})
    names = list(dict.fromkeys(k for row in rows for k in row if k.startswith("min to ")))
    order = [name for key in columns for name in (names if key == TARGETS else [key])]
    frame = pd.DataFrame(rows).reindex(columns=order).rename(columns=columns)
    empty = [column for column in frame if (frame[column] == "").all()]  # e.g. classes without a class layer
    return frame.drop(columns=empty).dropna(axis=1, how="all")


def leaderboard(records: list[dict]) -> pd.DataFrame:
    """Language-model records as a table, columns in COLUMNS order (absent figures left empty)."""
    return _table(records, COLUMNS)


def tagger_table(records: list[dict]) -> pd.DataFrame:
    """Tagger records (`test_f1`) as a table, columns in TAGGER_COLUMNS order."""
    return _table(records, TAGGER_COLUMNS)


def to_text(frame: pd.DataFrame) -> str:
    return frame.to_string(index=False, na_rep="", float_format=lambda x: f"{x:,.2f}" if abs(x) < 1e5 else f"{x:,.0f}")


def print_tables(records: list[dict]) -> None:
    """The language models' leaderboard, then the taggers' table, as text (each only if it has rows)."""
    taggers = [record for record in records if record_task(record) is TAGGER]
    models = [record for record in records if record_task(record) is not TAGGER]
    print("\n\n".join(to_text(table(rows)) for table, rows in ((leaderboard, models), (tagger_table, taggers)) if rows))
