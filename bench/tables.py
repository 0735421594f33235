"""Run records as pandas tables: one row per run, the columns of Mikolov et al. 2011's Tables 2 and 3."""

from __future__ import annotations

import pandas as pd

COLUMNS = {
    "model": "model",
    "output": "output",
    "corpus": "corpus",
    "parameters": "params",
    "valid_ppl": "valid ppl",
    "test_ppl": "test ppl (NN)",
    "nn_kn_test_ppl": "test ppl (NN+KN)",
    "oracle_ppl": "oracle ppl",
    "unigram_ppl": "unigram ppl",
    "tokens_per_second": "train tokens/s",
    "minutes_per_epoch": "min/epoch",
    "test_seconds": "test s",
    "peak_memory_mb": "peak MB",
}


def leaderboard(records: list[dict]) -> pd.DataFrame:
    """Language-model records as a table, columns in COLUMNS order (absent figures left empty)."""
    rows = [{**record, "output": record.get("config", {}).get("output", "")} for record in records]
    frame = pd.DataFrame(rows).reindex(columns=list(COLUMNS)).rename(columns=COLUMNS)
    return frame.dropna(axis=1, how="all")


def to_text(frame: pd.DataFrame) -> str:
    return frame.to_string(index=False, float_format=lambda x: f"{x:,.2f}" if abs(x) < 1e5 else f"{x:,.0f}")
