import os
from pathlib import Path

import pytest

# The corpora: $BENCH_DATA_DIR, else the suite's default, shared/data beside the checkout (bench.corpora).
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a missing corpus fails at once instead of retrying the Hub
os.environ.setdefault("WANDB_MODE", "offline")
# One intra-op thread: tests measure no speed, and with torch's default two threads a test on a busy 2-core
# machine waits at every OpenMP barrier (measured: one quick rnn-bp run 126 s with 2 threads, 7.9 s with 1).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f" {line} \n" for line in lines))
    return path


@pytest.fixture
def tiny_ptb(tmp_path):
    """A data directory holding a PTB-shaped corpus of a few sentences."""
    train = ["the cat sat", "the dog sat on the mat", "a cat <unk>"] * 20
    write_lines(tmp_path / "ptb" / "ptb.train.txt", train)
    write_lines(tmp_path / "ptb" / "ptb.valid.txt", ["the cat sat on a mat", "the zebra sat"])
    write_lines(tmp_path / "ptb" / "ptb.test.txt", ["a dog sat", "the cat"])
    return tmp_path
