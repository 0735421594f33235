"""How many threads torch computes with, and how they wait.

On a machine that other work shares, torch's default -- one OpenMP thread per core, spinning at every
barrier -- loses far more than the CPU the others take: a parallel region lasts as long as its slowest
thread, and a thread whose core is taken holds up the one that spins for it. Measured on 2 cores with two
other CPU-bound processes: `bench run` took over 15 minutes with two threads and 8 with one, against 2.5
idle (see README "Threads"). So the suite

- lets OpenMP threads sleep instead of spin when they wait (OMP_WAIT_POLICY=PASSIVE), set before torch
  is imported, and
- computes with as many threads as there are idle cores when the run starts (at least one), read from
  /proc/stat over a quarter of a second.

OMP_NUM_THREADS, or OMP_WAIT_POLICY, set by the user win over both.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

SAMPLE_SECONDS = 0.25


def quiet_waits() -> None:
    """Sleeping rather than spinning OpenMP waits; call before torch is imported."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cpu_times() -> tuple[float, float] | None:
    """(idle, total) jiffies of all CPUs since boot, or None where there is no /proc/stat."""
    try:
        fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + fields[4], sum(fields)  # idle + iowait


def idle_cores(seconds: float = SAMPLE_SECONDS) -> float | None:
    """How many cores stood idle over the next `seconds` (None where it cannot be read)."""
    before = cpu_times()
    time.sleep(seconds)
    after = cpu_times()
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1]) * (os.cpu_count() or 1)


def compute_threads(workers: int = 1) -> int:
    """Threads for each of `workers` processes: OMP_NUM_THREADS if set, else the idle cores shared out."""
    requested = os.environ.get("OMP_NUM_THREADS", "").split(",")[0]  # OpenMP's form: "2" or "2,1" (nested)
    if requested.strip().isdigit():
        return max(1, int(requested))
    idle = idle_cores()
    cores = os.cpu_count() or 1
    available = cores if idle is None else round(idle)
    return max(1, min(cores, available) // max(workers, 1))


def use_threads(workers: int = 1) -> int:
    """Set torch's intra-op threads for this process (see compute_threads); returns the number."""
    import torch

    threads = compute_threads(workers)
    torch.set_num_threads(threads)
    return threads
