"""The tasks a model is scored on, and every fact that follows from the task: which record figure selects
runs and in which direction, which metric the modules log every epoch, which figures a record carries.
Everything else (config, sweep specs, the store, reports, tables, regress) asks here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str  # as ModelSpec.task and the records' reports name it
    metric: str  # the record's validation figure that selects runs
    monitor: str  # the metric the module logs after every validation epoch, for early stopping and pruning
    direction: str  # Optuna's direction for `metric` (and for every figure in `sweep_metrics`)
    test_metric: str  # the record's test figure; a record holding it is one of this task's
    sweep_metrics: tuple[str, ...]  # record figures a sweep may optimise: validation only, never test
    regress_figures: tuple[str, ...]  # record figures `bench regress` compares with its baseline
    kn_metrics: tuple[str, ...] = ()  # sweep metrics of the NN+KN interpolation: every trial needs kn_order

    @property
    def mode(self) -> str:
        """Lightning's name for `direction` (checkpoints, early stopping)."""
        return "max" if self.direction == "maximize" else "min"


LANGUAGE_MODEL = Task("lm", metric="valid_ppl", monitor="val_ppl", direction="minimize", test_metric="test_ppl",
                      sweep_metrics=("valid_ppl", "nn_kn_valid_ppl"),
                      regress_figures=("valid_ppl", "test_ppl", "nn_kn_test_ppl"), kn_metrics=("nn_kn_valid_ppl",))
TAGGER = Task("tagging", metric="valid_f1", monitor="val_f1", direction="maximize", test_metric="test_f1",
              sweep_metrics=("valid_f1",), regress_figures=("valid_f1", "test_f1"))
TASKS = {task.name: task for task in (LANGUAGE_MODEL, TAGGER)}


def record_task(record: dict) -> Task:
    """The task of a stored record (older records do not name it): a tagger's holds its test figure."""
    return TAGGER if TAGGER.test_metric in record else LANGUAGE_MODEL


def metric_task(metric: str) -> Task:
    """The task whose records a study optimises by `metric` (a language model's unless a tagger's figure)."""
    return TAGGER if metric in (TAGGER.metric, TAGGER.test_metric, *TAGGER.sweep_metrics) else LANGUAGE_MODEL
