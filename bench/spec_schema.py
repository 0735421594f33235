"""The sweep spec's schema: each key with its meaning (README "Sweeps") and the check of its value on its own;
and the YAML source, which turns the key path an error carries (BenchError.key) into the file's line.

bench.sweep_spec checks what depends on several keys (the configurations, the metric, the sampler's options)
and builds the SweepSpec.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.errors import BenchError
from bench.inputs import compose, construct, read_utf8
from bench.store import MAX_RETRY

STUDY_NAME_LENGTH = 512  # Optuna's studies.study_name column (String(512)); PostgreSQL refuses a longer one
BUDGET = {"epochs": "max_epochs", "minutes": "max_minutes"}
OWN_KEYS = {"corpus": "corpus", "max_epochs": "budget.epochs", "max_minutes": "budget.minutes"}


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_study(value, key: tuple) -> None:
    if not isinstance(value, str) or not value.strip():
        raise BenchError("must be a non-empty name", key)
    if len(value.strip()) > STUDY_NAME_LENGTH:
        raise BenchError(f"must be at most {STUDY_NAME_LENGTH} characters (Optuna's column), got "
                         f"{len(value.strip())}", key)


def check_mapping(value, key: tuple) -> None:
    if value and not isinstance(value, dict):
        raise BenchError("must be a mapping of name: value", key)


def check_own_key(key: tuple) -> None:
    """A hyper-parameter that the spec sets with a key of its own (or, the model, at the top level)."""
    if key[-1] in OWN_KEYS:
        raise BenchError(f"set it as {OWN_KEYS[key[-1]]}", key)
    if key[-1] == "model" and key[0] == "fixed":
        raise BenchError("set the model with the top-level key model", key)


def check_fixed(value, key: tuple) -> None:
    check_mapping(value, key)
    for name in value or {}:
        check_own_key((*key, name))


def check_budget(value, key: tuple) -> None:
    check_mapping(value, key)
    for name, amount in (value or {}).items():
        if name not in BUDGET:
            raise BenchError(f"unknown budget; known: {', '.join(BUDGET)}", (*key, name))
        if not is_number(amount) or amount <= 0:
            raise BenchError(f"must be a positive number, got {amount!r}", (*key, name))


def check_if(valid: Callable[[object], bool], problem: str) -> Callable[[object, tuple], None]:
    def check(value, key: tuple) -> None:
        if not valid(value):
            raise BenchError(problem.format(value=value), key)
    return check


@dataclass(frozen=True)
class Field:
    help: str
    check: Callable[[object, tuple], None] | None = None  # of the value alone; the other keys' checks follow


FIELDS = {
    "study": Field("study name (default: the file name)", check_study),
    "model": Field("model name, or a plugin class as module.path:ClassName (or give `model` in the grid)"),
    "corpus": Field("corpus name"),
    "metric": Field("record figure to optimise (default: valid_ppl; valid_f1 for taggers)"),
    "direction": Field("minimize or maximize (default: the metric's)", check_if(
        lambda v: v in ("minimize", "maximize"), "must be minimize or maximize, got {value!r}")),
    "project": Field("W&B project (default: $WANDB_PROJECT, else bench)",
                     check_if(lambda v: v is None or (isinstance(v, str) and v != ""), "must be a W&B project name")),
    "fixed": Field("hyper-parameters every trial uses", check_fixed),
    "search": Field("parameter -> list of choices, or {type, low, high[, step]} / {type: categorical, choices}",
                    check_mapping),
    "grid": Field("parameter -> list of values, or a list of such mappings"),
    "sampler": Field("tpe, random or grid, or {type: ..., Optuna options}"),
    "pruner": Field("median, hyperband or none, or {type: ..., Optuna options}"),
    "trials": Field("trials in the study in total", check_if(
        lambda v: is_number(v) and isinstance(v, int) and v >= 1, "must be a positive integer, got {value!r}")),
    "max_retry": Field(f"times a trial whose worker died (killed, out of memory) is run again (default: {MAX_RETRY})",
                       check_if(lambda v: is_number(v) and isinstance(v, int) and v >= 0,
                                "must be a whole number, 0 or more, got {value!r}")),
    "seeds": Field("with a grid: run every grid point with each of these seeds (a count n: seeds 0..n-1)"),
    "budget": Field("per trial: {epochs, minutes}", check_budget),
}


def check_fields(data) -> None:
    """A mapping of known keys, each value of its key's type."""
    if not isinstance(data, dict):
        raise BenchError(f"a spec is a mapping with keys {', '.join(FIELDS)}", ())
    for key in data:
        if key not in FIELDS:
            raise BenchError(f"unknown key; known: {', '.join(FIELDS)}", (key,))
    for key, field in FIELDS.items():
        if key in data and field.check:
            field.check(data[key], (key,))


class Source:
    """The spec file's composed YAML nodes: which line a key path is on (the node marks), and errors that say so."""

    def __init__(self, path: Path, root: yaml.Node | None):
        self.path, self.root = path, root

    def line(self, keys: tuple) -> int:
        node, line = self.root, 1
        for key in keys:
            if isinstance(node, yaml.MappingNode):
                match = [(k, v) for k, v in node.value if k.value == str(key)]
                if not match:
                    break
                line, node = match[0][0].start_mark.line + 1, match[0][1]
            elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
                node = node.value[key]
                line = node.start_mark.line + 1
            else:
                break
        return line

    def locate(self, error: BenchError) -> BenchError:
        """`error` (its key a path of spec keys) as the file, line and key path it is about."""
        where, name = f"{self.path}, line {self.line(error.key)}", ".".join(map(str, error.key))
        return BenchError(f"{where}, {name}: {error}" if name else f"{where}: {error}")

    def check_duplicates(self, node: yaml.Node | None = None, keys: tuple = ()) -> None:
        node = self.root if node is None else node
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key, value in node.value:
                if key.value in seen:
                    raise BenchError(f"{self.path}, line {key.start_mark.line + 1}, "
                                     f"{'.'.join(map(str, (*keys, key.value)))}: given twice")
                seen.add(key.value)
                self.check_duplicates(value, (*keys, key.value))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self.check_duplicates(item, (*keys, index))


def parse_yaml(path: Path) -> tuple[object, Source]:
    if not path.is_file():
        raise BenchError(f"no sweep spec at {path}")
    root = compose(read_utf8(path), str(path))
    data = construct(root, str(path))
    source = Source(path, root)
    source.check_duplicates()
    return data, source
