"""The report's files: its tables as CSV, and README.md and index.html of its tables and plots."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np
import pandas as pd

from bench.errors import BenchError
from bench.records import write_atomically

OUTPUTS = ("leaderboard.csv", "taggers.csv", "table2.csv", "table3.csv", "speed.png", "classes.png", "epochs.png",
           "wall_clock.png", "README.md", "index.html")
TITLES = {"leaderboard": "Leaderboard (language models, best run per configuration)",
          "taggers": "Taggers (best run per configuration)",
          "table2": "Table 2: test perplexity, NN alone and NN+KN5 (paper: Mikolov et al. 2011, PTB; "
                    "LSTM: Zaremba et al. 2014)",
          "table3": "Table 3: RNN-BPTT, classes vs perplexity and speed (paper: Mikolov et al. 2011, PTB)"}


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


def clear_previous_report(out: Path) -> None:
    """Create `out`, without the files of a report written there before."""
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # a previous report's files must not survive as if this one wrote them
        (out / name).unlink(missing_ok=True)


def write_tables(tables: dict[str, pd.DataFrame], out: Path, stamp: str) -> None:
    """Each table as `<name>.csv`, headed by its title, its runs' provenance and `stamp` (generated_by)."""
    for name, table in tables.items():
        # provenance as comment lines: read_csv(..., comment="#")
        write_atomically(out / f"{name}.csv", f"# {TITLES[name]}\n# runs: {table.attrs['provenance']}\n# {stamp}\n"
                         + table.to_csv(index=False))


def write_pages(tables: dict[str, pd.DataFrame], figures: dict[str, Path], studies: list[str], out: Path,
                stamp: str) -> None:
    """README.md and index.html (sortable tables, plots inline) of `tables` and `figures` into `out`."""
    md = [f"# bench report\n\n{stamp}; studies: {', '.join(studies)}.\n"]
    page = [f"<h1>bench report</h1><p class='meta'>{html.escape(stamp)}; studies: "
            f"{html.escape(', '.join(studies))}. Click a column header to sort.</p>"]
    for name, table in tables.items():
        meta = f"Runs: {table.attrs['provenance']}. {stamp[0].upper()}{stamp[1:]}. CSV: {name}.csv"
        md.append(f"## {TITLES[name]}\n\n{markdown(table)}\n\n{meta}\n")
        page.append(f"<h2>{html.escape(TITLES[name])}</h2>"
                    + formatted(table).to_html(index=False, classes="report", border=0)
                    + f"<p class='meta'>{html.escape(meta)}</p>")
    for title, path in figures.items():
        md.append(f"## {title}\n\n![{title}]({path.name})\n")
        encoded = base64.b64encode(path.read_bytes()).decode()
        page.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
                    f"src='data:image/png;base64,{encoded}'>")
    write_atomically(out / "README.md", "\n".join(md))
    write_atomically(
        out / "index.html", f"<!doctype html>\n<html lang='en'><head><meta charset='utf-8'><title>bench report</title>"
        f"<style>{STYLE}</style></head>\n<body>\n{chr(10).join(page)}\n<script>{SORT_SCRIPT}</script>\n</body></html>\n")


# The block of another Markdown file (the project's README) that `bench report --readme FILE` rewrites with
# Tables 2 and 3, so the numbers a reader meets first come from the results store, not from a hand copy.
README_BLOCK = ("<!-- bench report --readme: start -->", "<!-- bench report --readme: end -->")


def paper_tables_markdown(tables: dict[str, pd.DataFrame]) -> str:
    """Tables 2 and 3 (those with figures) as Markdown, each with its runs' provenance; no generated-at
    line, so the text changes only when the results do."""
    return "\n\n".join(f"**{TITLES[name]}**\n\n{markdown(tables[name])}\n\nRuns: {tables[name].attrs['provenance']}."
                       for name in ("table2", "table3") if name in tables)


def readme_around_block(path: Path) -> tuple[str, str]:
    """The Markdown file `path` before and after its README_BLOCK (markers included): read before any
    report file is written, so a file without the block fails the command with nothing written."""
    start, end = README_BLOCK
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise BenchError(f"--readme {path}: cannot read it ({getattr(error, 'strerror', None) or error})") from None
    head, found_start, rest = text.partition(start)
    _, found_end, tail = rest.partition(end)
    if not (found_start and found_end):
        raise BenchError(f"--readme {path}: no block between the lines {start} and {end} to write the tables into")
    return head + start, end + tail


def write_readme_block(tables: dict[str, pd.DataFrame], path: Path, around: tuple[str, str]) -> None:
    """`path` as `around` with `paper_tables_markdown(tables)` in its block."""
    head, tail = around
    write_atomically(path, f"{head}\n{paper_tables_markdown(tables)}\n{tail}")
