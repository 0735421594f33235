"""RunRecord: the one shape a record is written and read in (store, record.json, reports)."""

import optuna

from bench.records import RunRecord
from bench.reports import load_runs
from bench.store import open_storage, save_record

COUNTED = RunRecord(
    run={"model": "rnn-bptt", "corpus": "synthetic"},
    quality={"valid_ppl": 120.5, "test_ppl": 118.25, "oracle_ppl": 50.0, "minutes_to_target": {"150": 0.5}},
    speed={"epochs": 2.5, "train_tokens": 30_000, "train_seconds": 12.0, "training_flops_per_token": 1e6,
           "stopped_by": "max_minutes",
           "wall_minutes": 0.3, "curve": [{"epoch": 0, "wall_minutes": 0.1, "val_ppl": 130.0}], "resumed": 0,
           "recovered_from": [], "test_seconds": 1.5},
    provenance={"parameters": 1234, "peak_memory_mb": 300.0, "device": "cpu", "threads": 1, "seed": 0,
                "git_commit": "abc", "versions": {"torch": "2.13.0"}, "config": {"model": "rnn-bptt", "seed": 0}},
)
# A record as the store held it before the raw counts (today's keys, the GFLOP/s probe's among them).
PREVIOUS = {"model": "lstm", "corpus": "synthetic", "valid_ppl": 110.0, "test_ppl": 115.0, "epochs": 3,
            "stopped_by": "schedule", "tokens_per_second": 2048.0, "gflops": 1.5, "matmul_gflops": 90.0,
            "roofline_fraction": 1.5 / 90.0, "minutes_per_epoch": 0.75, "wall_minutes": 2.5, "curve": [],
            "test_seconds": 2.0, "parameters": 99, "seed": 1, "config": {"model": "lstm", "seed": 1}}


def test_rates_derive_from_the_raw_counts():
    assert COUNTED.tokens_per_second == 2500.0  # 30,000 tokens in 12 s
    assert COUNTED.minutes_per_epoch == 12.0 / 2.5 / 60
    flat = COUNTED.to_dict()
    assert (flat["tokens_per_second"], flat["minutes_per_epoch"]) == (2500.0, 0.08)
    assert flat["gflops"] == 2.5  # 1e6 FLOPs a token at 2,500 tokens/s
    assert "roofline_fraction" not in flat and "matmul_gflops" not in flat
    uncounted = RunRecord({}, {}, {**COUNTED.speed, "training_flops_per_token": None}, {})
    assert uncounted.gflops is None
    stopped_at_once = RunRecord({}, {}, {**COUNTED.speed, "epochs": 0, "train_tokens": 0, "train_seconds": 0.0}, {})
    assert stopped_at_once.minutes_per_epoch == 0.0


def test_a_record_goes_through_the_store_and_back_unchanged(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path}/results.db")
    save_record(COUNTED.to_dict(), storage, "round-trip")
    (trial,) = optuna.load_study(study_name="round-trip", storage=storage).trials
    assert RunRecord.from_dict(trial.user_attrs["record"]) == COUNTED
    assert trial.user_attrs["tokens_per_second"] == 2500.0  # a SUMMARY_KEYS column, derived
    assert trial.value == 120.5


def test_a_record_of_the_previous_shape_loads_and_reports_its_stored_rates(tmp_path):
    previous = RunRecord.from_dict(PREVIOUS)
    assert (previous.tokens_per_second, previous.minutes_per_epoch) == (2048.0, 0.75)
    assert previous.to_dict() == PREVIOUS
    url = f"sqlite:///{tmp_path}/results.db"
    save_record(PREVIOUS, open_storage(url), "previous")
    (row,) = load_runs(url).to_dict("records")
    assert (row["tokens_per_second"], row["minutes_per_epoch"], row["epochs"], row["gflops"]) == (2048.0, 0.75, 3, 1.5)
    assert row["record"] == PREVIOUS
