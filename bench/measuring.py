"""The measuring subprocess of `bench regress` (`python -m bench.measuring PLAN RESULT`, see bench.regress):
each run's quality figures, and its training speed in CPU time against a calibration of the machine."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import lightning.pytorch as pl
import torch

from bench.errors import BenchError
from bench.records import RunRecord
from bench.regress import MEASURING_ENV, THREADS
from bench.tasks import TASKS


class StepClock(pl.Callback):
    """CPU seconds (time.process_time) of the training steps, timed where bench.callbacks.SpeedMonitor times
    its wall seconds. CPU time, because on a shared machine other processes take the core for part of a step:
    in a probe of 3 runs on 2 busy cores, the wall-clock ratio of one model spread up to 48%, the CPU-time
    ratio up to 8%."""

    def __init__(self):
        self.seconds = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds += time.process_time() - self._start


def calibrate(blocks: int = 10) -> dict:
    """This machine's speed now, in CPU time: the median of `blocks` timings each of fp32 matmul throughput
    (256x256 products, GFLOP/s: compute-bound) and of small training steps (a 32x128 tanh layer forward and
    backward, steps/s: the per-operation overhead that dominates this set's small models). Their geometric
    mean tracked the models' own swings under load better than either alone (measured: coefficient of
    variation of the ratio 9.9% with the matmul alone, 8.4% with both, for the noisiest model here)."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 256, generator=generator), torch.randn(256, 256, generator=generator)
    x, w = torch.randn(32, 128, generator=generator), torch.randn(128, 128, generator=generator, requires_grad=True)
    out = torch.mm(a, b)
    gflops, steps = [], []
    for _ in range(blocks):
        start = time.process_time()
        for _ in range(20):
            torch.mm(a, b, out=out)
        gflops.append(2 * 256**3 * 20 / (time.process_time() - start) / 1e9)
        start = time.process_time()
        for _ in range(200):
            torch.tanh(x @ w).sum().backward()
        steps.append(200 / (time.process_time() - start))
    gflops, steps = statistics.median(gflops), statistics.median(steps)
    return {"gflops": gflops, "steps": steps, "speed": machine_speed(gflops, steps)}


def machine_speed(gflops: float, steps: float) -> float:
    """The calibration the speed ratio divides by: the geometric mean of the two measured rates."""
    return (gflops * steps) ** 0.5


def timed_training(config: dict, min_seconds: float, data_dir: str | None) -> tuple[float, float]:
    """(tokens, CPU seconds) of the training steps of runs of `config`, repeated until `min_seconds` are
    timed (one to three runs of a neural model here; ~40 of the n-gram model, whose counting pass takes ~40 ms)."""
    from bench.harness import run_experiment

    tokens = seconds = 0.0
    while seconds < min_seconds:
        clock = StepClock()
        record = RunRecord.from_dict(run_experiment(config, data_dir=data_dir, progress=False, callbacks=(clock,)))
        tokens += record.speed["train_tokens"]
        seconds += clock.seconds
    return tokens, seconds


def machine() -> dict:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return {"hostname": platform.node(), "cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(), "system": platform.platform()}


def measure(runs: list[dict], repeats: int, min_seconds: float, data_dir: str | None) -> dict:
    """Run the set in this process: each run's quality config once, then `repeats` rounds over the speed
    configs, each timed between two calibrations (rounds interleave the models, so a passing disturbance
    hits one repetition of each rather than every repetition of one)."""
    from bench.harness import git_commit, library_versions, run_experiment

    torch.set_num_threads(THREADS)
    results = {}
    for number, run in enumerate(runs, 1):
        quality = {}
        if run["quality"]:  # None: a confirmation of speed only
            print(f"[quality {number}/{len(runs)}] {run['name']}", flush=True)
            record = run_experiment(run["quality"], data_dir=data_dir, progress=False)
            quality = {f: record[f] for f in TASKS[run["task"]].regress_figures if record.get(f) is not None}
        results[run["name"]] = {**{k: run[k] for k in ("model", "corpus", "task")}, "config": run["quality"],
                                "quality": quality, "speed": None}
    timed = [run for run in runs if run["speed"]]
    for round_ in range(1, repeats + 1):
        print(f"[speed round {round_}/{repeats}] {', '.join(run['name'] for run in timed)}", flush=True)
        for run in timed:
            before = calibrate()
            tokens, seconds = timed_training(run["speed"], min_seconds, data_dir)
            after = calibrate()
            speed = results[run["name"]]["speed"] or {"config": run["speed"], "tokens_per_cpu_second": [],
                                                      "calibration": [], "ratios": []}
            calibration = {k: statistics.mean([before[k], after[k]]) for k in ("gflops", "steps")}
            speed["tokens_per_cpu_second"].append(tokens / seconds)
            speed["calibration"].append(calibration)
            speed["ratios"].append(tokens / seconds / machine_speed(**calibration))
            speed["ratio"] = statistics.median(speed["ratios"])
            results[run["name"]]["speed"] = speed
    meta = {"commit": git_commit(), "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
            "versions": library_versions(), "threads": THREADS, "repeats": repeats, "speed_seconds": min_seconds,
            "environment": MEASURING_ENV}
    return {"meta": meta, "runs": results}




def worker(plan_path: str, result_path: str) -> None:
    """The measuring subprocess: read the plan, measure, write the measurements (or a user error) as JSON."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")  # Lightning's advice, as `bench` itself keeps it out of its output
    for name in ("lightning.pytorch", "lightning.fabric", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    work = json.loads(Path(plan_path).read_text())
    try:
        result = measure(work["runs"], work["repeats"], work["min_seconds"], work["data_dir"])
    except BenchError as error:
        result = {"error": str(error)}
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    worker(*sys.argv[1:])
