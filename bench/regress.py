"""`bench regress`: re-run a fixed, seeded set of runs and compare every figure with a committed baseline.

The set: every model (built-in, and the installed plugins) on `synthetic` (and, when the data directory has
PTB, a short PTB slice for a few models), with fixed small budgets. Two kinds of figure:

- quality (perplexity; F1 for taggers, ModelSpec.task == "tagging"): deterministic on CPU for a seed, so the
  tolerance is tight -- relative TIGHT when the torch version and the CPU's instruction set (torch's
  cpu capability) match the baseline's, else LOOSE (other kernels round differently and training amplifies
  it). Only a change for the worse beyond the tolerance is a regression.
- speed: training tokens per CPU second (the harness's timed training steps, timed again in CPU time by
  bench.measuring.StepClock) divided by a calibration of the machine measured around it in the same process
  (bench.measuring.calibrate), median of `repeats` repetitions. A slower machine lowers both, so the ratio
  moves far less than raw tokens/s; a ratio more than SPEED_THRESHOLD below the baseline's
  (SPEED_THRESHOLD_OTHER_CPU when the CPU model differs, as a ratio shifts between microarchitectures) is a
  regression -- once confirmed: a run whose ratio falls that far is measured `repeats` times more (a
  disturbance of the machine passes, a slowdown of the code stays) and judged on the median of all its
  repetitions.

Everything is measured in a subprocess (`python -m bench.measuring PLAN RESULT`) started with glibc's malloc
thresholds raised and one torch thread (see MEASURING_ENV). The baseline is the measurements JSON of a run
with --update, with the commit, machine, date and library versions in it; a run whose configuration differs
from the baseline's is not comparable and fails too (regenerate the baseline).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

from bench.errors import BenchError
from bench.records import check_writable, write_atomically
from bench.tasks import TASKS

TIGHT, LOOSE = 1e-4, 1e-2  # relative quality tolerance: same torch and cpu capability / otherwise
SPEED_THRESHOLD = 0.15  # relative drop of the speed ratio that counts as a regression on the baseline's CPU model
SPEED_THRESHOLD_OTHER_CPU = 0.35  # on another CPU model the ratio shifts by itself; a 2x slowdown still fails
MIN_TIMED_SECONDS = 1.5  # CPU seconds of training steps per speed repetition (--speed-seconds)
QUALITY_BATCHES = 100  # training batches per epoch of the quality runs and of each timed speed run
QUALITY = dict(max_epochs=2)  # two epochs: the plateau schedule, early stopping and the best checkpoint run
SPEED = dict(max_epochs=1, kn_order=0, eval_batch_size=16)  # scoring is not timed; keep it short
PTB = {"kn": {}, "rnn-bptt": dict(output="class", classes=100), "lstm": dict(output="adaptive")}
PTB_BUDGET = dict(max_epochs=1, limit_train_batches=200)
SPEED_FIGURE = "speed ratio"
FAILING = ("REGRESSION", "config changed")
# glibc hands big freed buffers back to the kernel and maps them again on the next step (timings on the
# development machine swung 15-30% from it); glibc reads these only at start-up, hence the subprocess.
MEASURING_ENV = {"MALLOC_MMAP_THRESHOLD_": str(10**10), "MALLOC_TRIM_THRESHOLD_": str(10**10)}
# One torch thread: a runner's core count enters neither the speed ratio nor the float rounding, and two
# threads on two busy cores stalled the thread pool here (one calibration took 45 s instead of 0.2 s).
THREADS = 1


# ------------------------------------------------------------------------------------------------ the set


def ptb_available(data_dir: str | None) -> bool:
    from bench.corpora import FILE_CORPORA, resolve_data_dir

    root = resolve_data_dir(data_dir)
    return all((root / path).is_file() for path in FILE_CORPORA["ptb"].files.values())


def plan(models: list[str] | None = None, batches: int = QUALITY_BATCHES, data_dir: str | None = None) -> list[dict]:
    """The runs of the set (validated configurations): per run its quality config and, on synthetic, its
    speed config."""
    from bench.config import allowed_keys, make_config
    from bench.models.plugins import model_names, model_spec

    def config(model: str, overrides: dict) -> dict:
        budget = {"limit_train_batches": batches, **overrides} if model_spec(model).neural else {}
        return make_config(model, {k: v for k, v in budget.items() if k in allowed_keys(model)}, quick=True)

    runs = []
    for model in models or model_names():
        runs.append({"name": f"{model}/synthetic", "model": model, "corpus": "synthetic",
                     "task": model_spec(model).task, "quality": config(model, QUALITY), "speed": config(model, SPEED)})
    if ptb_available(data_dir):
        for model in [m for m in PTB if m in (models or PTB)]:
            overrides = {"corpus": "ptb", **PTB_BUDGET, **PTB[model]}
            quality = make_config(model, overrides if model_spec(model).neural else {"corpus": "ptb"}, quick=True)
            runs.append({"name": f"{model}/ptb", "model": model, "corpus": "ptb", "task": model_spec(model).task,
                         "quality": quality, "speed": None})
    return runs


def run_set(runs: list[dict], repeats: int, min_seconds: float, data_dir: str | None) -> dict:
    """measure() in a fresh subprocess started with MEASURING_ENV (glibc reads it only at start-up)."""
    with tempfile.TemporaryDirectory(prefix="bench-regress-") as folder:
        plan_path, result_path = Path(folder) / "plan.json", Path(folder) / "result.json"
        plan_path.write_text(json.dumps({"runs": runs, "repeats": repeats, "min_seconds": min_seconds,
                                         "data_dir": data_dir}))
        done = subprocess.run([sys.executable, "-m", "bench.measuring", str(plan_path), str(result_path)],
                              env={**os.environ, **MEASURING_ENV})
        result = json.loads(result_path.read_text()) if result_path.is_file() else None
    if result and "error" in result:
        raise BenchError(result["error"])
    if done.returncode or result is None:
        raise RuntimeError(f"the measuring subprocess failed with exit code {done.returncode} (its output is above)")
    return result


# ------------------------------------------------------------------------------------------ comparing


def load_baseline(path: Path) -> dict:
    """The baseline JSON, checked: a missing or malformed file is a user error naming what is wrong."""
    hint = "record one with `bench regress --update`"
    if not path.is_file():
        raise BenchError(f"no baseline at {path}: {hint}")
    try:
        baseline = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BenchError(f"{path}: not JSON ({error}); {hint}") from None
    except RecursionError:
        raise BenchError(f"{path}: not a regression baseline (nested too deeply to read); {hint}") from None
    problem = baseline_problem(baseline)
    if problem:
        raise BenchError(f"{path}: not a regression baseline ({problem}); {hint}")
    return baseline


def baseline_problem(baseline) -> str | None:
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if not isinstance(baseline, dict) or not isinstance(baseline.get("meta"), dict):
        return "no 'meta' object"
    if not isinstance(baseline.get("runs"), dict) or not baseline["runs"]:
        return "no 'runs' object"
    for name, run in baseline["runs"].items():
        if not isinstance(run, dict) or run.get("task") not in TASKS or not isinstance(run.get("config"), dict):
            return f"run {name!r} lacks its task or config"
        if not isinstance(run.get("quality"), dict) or not all(map(number, run["quality"].values())):
            return f"run {name!r}: quality figures must be numbers"
        speed = run.get("speed")
        if speed is not None and not (isinstance(speed, dict) and number(speed.get("ratio"))
                                      and isinstance(speed.get("config"), dict)):
            return f"run {name!r}: speed needs a numeric 'ratio' and its 'config'"
    return None


def same(baseline: dict, current: dict, *keys: tuple[str, str]) -> bool:
    """Whether the two runs' meta agree on every (section, key), e.g. ("versions", "torch")."""
    old, new = baseline.get("meta") or {}, current["meta"]
    return bool(old) and all(old.get(a, {}).get(b) == new.get(a, {}).get(b) for a, b in keys)


def config_changes(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k} {old.get(k, '—')} → {new.get(k, '—')}" for k in keys if old.get(k) != new.get(k))


def verdict(change: float, allowed: float, higher_is_better: bool) -> str:
    """`change` is relative (now / baseline - 1); `allowed` the tolerated relative move for the worse."""
    worse = -change if higher_is_better else change
    return "REGRESSION" if worse > allowed else "better" if worse < -allowed else "ok"


def compare(baseline: dict, current: dict) -> pd.DataFrame:
    """One row per compared figure: run, figure, baseline, now, change, allowed, verdict, detail."""
    # the same torch and instruction set should give the same floats; the same CPU model, the same ratios
    tolerance = TIGHT if same(baseline, current, ("versions", "torch"), ("machine", "cpu_capability")) else LOOSE
    threshold = SPEED_THRESHOLD if same(baseline, current, ("machine", "cpu")) else SPEED_THRESHOLD_OTHER_CPU
    old_runs, new_runs = baseline.get("runs", {}), current["runs"]
    rows = []
    for name in [*new_runs, *(n for n in old_runs if n not in new_runs)]:
        old, new = old_runs.get(name), new_runs.get(name)
        if old is None or new is None:
            run, status = (new, "new") if old is None else (old, "not run")
            rows += [dict(run=name, figure=f, baseline=run["quality"][f] if old else None,
                          now=run["quality"][f] if new else None, verdict=status) for f in run["quality"]]
            if run.get("speed"):
                rows.append(dict(run=name, figure=SPEED_FIGURE, baseline=old and old["speed"]["ratio"],
                                 now=new and new["speed"]["ratio"], verdict=status))
            continue
        changed = config_changes(old["config"], new["config"])
        if old.get("speed") and new.get("speed"):
            changed = changed or config_changes(old["speed"]["config"], new["speed"]["config"])
        if changed:
            rows.append(dict(run=name, figure="configuration", verdict="config changed", detail=changed))
            continue
        higher = TASKS[new["task"]].direction == "maximize"
        for figure in new["quality"]:
            if figure not in old["quality"]:
                rows.append(dict(run=name, figure=figure, now=new["quality"][figure], verdict="new"))
                continue
            a, b = old["quality"][figure], new["quality"][figure]
            rows.append(dict(run=name, figure=figure, baseline=a, now=b, change=b / a - 1, allowed=tolerance,
                             verdict=verdict(b / a - 1, tolerance, higher)))
        if old.get("speed") and new.get("speed"):
            a, b = old["speed"]["ratio"], new["speed"]["ratio"]
            tokens = statistics.median(new["speed"]["tokens_per_cpu_second"])
            gflops, steps = (statistics.median(c[k] for c in new["speed"]["calibration"]) for k in ("gflops", "steps"))
            rows.append(dict(run=name, figure=SPEED_FIGURE, baseline=a, now=b, change=b / a - 1,
                             allowed=threshold, verdict=verdict(b / a - 1, threshold, True),
                             detail=f"now {tokens:,.0f} tokens/s at {gflops:.0f} GFLOP/s, {steps:,.0f} steps/s; "
                                    f"{len(new['speed']['ratios'])} repetitions"))
    columns = ["run", "figure", "baseline", "now", "change", "allowed", "verdict", "detail"]
    return pd.DataFrame(rows, columns=columns)


# ------------------------------------------------------------------------------------------- reporting


def cells(row) -> list[str]:
    def figure(value) -> str:
        return "—" if pd.isna(value) else f"{value:,.4f}" if abs(value) < 1e5 else f"{value:,.0f}"

    allowed = "—" if pd.isna(row.allowed) else f"{row.allowed:.2%}" if row.allowed >= 1e-3 else f"{row.allowed:.0e}"
    change = "—" if pd.isna(row.change) else f"{row.change:+.4%}" if abs(row.change) < 1e-2 else f"{row.change:+.2%}"
    mark = f"**{row.verdict}**" if row.verdict in FAILING else row.verdict
    detail = "" if pd.isna(row.detail) else row.detail
    return [row.run, row.figure, figure(row.baseline), figure(row.now), change, allowed, mark, detail]


def describe(meta: dict) -> str:
    machine, versions = meta.get("machine", {}), meta.get("versions", {})
    return (f"commit {str(meta.get('commit'))[:10]}, {meta.get('date')}, {machine.get('hostname')} "
            f"({machine.get('cpu')}, {machine.get('cpu_capability')}), torch {versions.get('torch')}, "
            f"lightning {versions.get('lightning')}, python {versions.get('python')}")


def render(rows: pd.DataFrame, baseline: dict, current: dict, baseline_path: Path, updated: bool) -> str:
    """The Markdown summary: verdict, what was compared with what, one table row per figure."""
    failed = rows[rows["verdict"].isin(FAILING)]
    if updated:
        title = f"baseline written to `{baseline_path}`"
    else:
        title = f"FAIL: {len(failed)} regression(s)" if len(failed) else "PASS"
    header = ["run", "figure", "baseline", "now", "change", "allowed", "verdict", "detail"]
    lines = [f"## bench regress: {title}", ""]
    if baseline.get("meta"):
        lines.append(f"- baseline `{baseline_path}`: {describe(baseline['meta'])}")
    lines += [f"- this run: {describe(current['meta'])}",
              f"- quality (perplexity, F1): deterministic for the seed; allowed relative move for the worse "
              f"{TIGHT:.0e} with the baseline's torch version and cpu capability, else {LOOSE:.0e}",
              f"- {SPEED_FIGURE}: training tokens per CPU second ÷ machine speed measured around it (√(fp32 "
              f"matmul GFLOP/s × small training steps/s)), median of {current['meta']['repeats']} repetitions "
              f"(more when confirming a drop), {THREADS} thread; allowed drop {SPEED_THRESHOLD:.0%} on the "
              f"baseline's CPU model, else {SPEED_THRESHOLD_OTHER_CPU:.0%}", "",
              "| " + " | ".join(header) + " |", "|" + "|".join("---:" if 2 <= i <= 5 else "---"
                                                           for i in range(len(header))) + "|"]
    # pandas' to_markdown needs tabulate (not a dependency); bench.reports rounds to 2 decimals, too coarse here
    lines += ["| " + " | ".join(cells(row)) + " |" for row in rows.itertuples(index=False)]
    if len(failed):
        lines += ["", "Regressions: " + "; ".join(f"{r.run} {r.figure} ({r.verdict}"
                                                  + (f", {r.change:+.2%}" if pd.notna(r.change) else "") + ")"
                                                  for r in failed.itertuples(index=False))]
    if (rows["verdict"].isin(("better", "new", "not run"))).any() and not updated:
        lines += ["", "Rows marked better/new/not run do not fail; `bench regress --update` records this run."]
    return "\n".join(lines) + "\n"


def regress(baseline_path: Path, out: Path, update: bool = False, models: list[str] | None = None,
            batches: int = QUALITY_BATCHES, repeats: int = 3, min_seconds: float = MIN_TIMED_SECONDS,
            data_dir: str | None = None) -> int:
    """Run the set, compare with the baseline (or rewrite it with `update`), write the result JSON and the
    Markdown summary into `out`; return the exit code: 1 on any regression, else 0."""
    if batches < 1 or repeats < 1 or not min_seconds > 0:
        raise BenchError(f"--batches and --repeats must be at least 1 and --speed-seconds above 0, got {batches}, "
                         f"{repeats} and {min_seconds}")
    baseline = {} if update else load_baseline(baseline_path)
    runs = plan(models, batches, data_dir)
    if not update and not {run["name"] for run in runs} & set(baseline["runs"]):
        raise BenchError(f"{baseline_path} shares no run with this set (baseline: {', '.join(baseline['runs'])}; "
                         f"this set: {', '.join(run['name'] for run in runs)}): nothing to compare; choose "
                         "--models of the baseline, or record this set with --update")
    check_writable(out)
    if update:
        check_writable(baseline_path.parent)
    current = run_set(runs, repeats, min_seconds, data_dir)
    rows = compare(baseline, current)
    slower = set(rows["run"][(rows["figure"] == SPEED_FIGURE) & (rows["verdict"] == "REGRESSION")])
    if slower:
        print(f"[confirming the speed of {', '.join(sorted(slower))}]", flush=True)
        again = run_set([{**run, "quality": None} for run in runs if run["name"] in slower], repeats, min_seconds,
                        data_dir)
        for name in slower:
            speed = current["runs"][name]["speed"]
            for key in ("tokens_per_cpu_second", "calibration", "ratios"):
                speed[key] += again["runs"][name]["speed"][key]
            speed["ratio"] = statistics.median(speed["ratios"])
        rows = compare(baseline, current)
    summary = render(rows, baseline, current, baseline_path, update)
    failed = rows[rows["verdict"].isin(FAILING)]
    result = {"verdict": "updated" if update else "fail" if len(failed) else "pass", "baseline": str(baseline_path),
              "regressions": [f"{r.run} {r.figure}" for r in failed.itertuples(index=False)],
              "rows": json.loads(rows.to_json(orient="records")), "current": current}
    write_atomically(out / "result.json", json.dumps(result, indent=1))
    write_atomically(out / "summary.md", summary)
    if update:
        write_atomically(baseline_path, json.dumps(current, indent=1) + "\n")
    if os.environ.get("GITHUB_STEP_SUMMARY"):
        with open(os.environ["GITHUB_STEP_SUMMARY"], "a") as step_summary:
            step_summary.write(summary)
    print(summary)
    return 1 if len(failed) and not update else 0
