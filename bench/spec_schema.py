"""The sweep spec's schema, a table: each key (README "Sweeps" says what it means) and the rules its value alone
must meet; and the YAML source, which turns the key path an error carries (BenchError.key) into the file's
line. bench.sweep_spec checks what depends on several keys and builds the SweepSpec."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.errors import BenchError
from bench.inputs import compose, construct, read_utf8

STUDY_NAME_LENGTH = 512  # Optuna's studies.study_name column (String(512)); PostgreSQL refuses a longer one
BUDGET = {"epochs": "max_epochs", "minutes": "max_minutes"}
OWN_KEYS = {"corpus": "corpus", "max_epochs": "budget.epochs", "max_minutes": "budget.minutes"}


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_count(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def own_key_problem(key: tuple) -> str | None:
    """A hyper-parameter that the spec sets with a key of its own (or, the model, at the top level)."""
    if key[-1] in OWN_KEYS:
        return f"set it as {OWN_KEYS[key[-1]]}"
    return "set the model with the top-level key model" if key[-1] == "model" and key[0] == "fixed" else None


def budget_problem(key: tuple, amount) -> str | None:
    if key[-1] not in BUDGET:
        return f"unknown budget; known: {', '.join(BUDGET)}"
    return None if is_number(amount) and amount > 0 else f"must be a positive number, got {amount!r}"


@dataclass(frozen=True)
class Field:
    rules: tuple[tuple[Callable[[object], bool], str], ...] = ()  # (valid, the error otherwise), in order
    mapping: bool = False  # a mapping of name: value
    entry: Callable[[tuple, object], str | None] | None = None  # the problem of a mapping's entry (key, value)


FIELDS = {
    "study": Field(((lambda v: isinstance(v, str) and bool(v.strip()), "must be a non-empty name"),
                    (lambda v: len(v.strip()) <= STUDY_NAME_LENGTH,
                     f"must be at most {STUDY_NAME_LENGTH} characters (Optuna's column), got {{length}}"))),
    "model": Field(), "corpus": Field(), "metric": Field(),
    "direction": Field(((lambda v: v in ("minimize", "maximize"), "must be minimize or maximize, got {value!r}"),)),
    "project": Field(((lambda v: v is None or (isinstance(v, str) and v != ""), "must be a W&B project name"),)),
    "fixed": Field(mapping=True, entry=lambda key, _: own_key_problem(key)),
    "search": Field(mapping=True), "grid": Field(), "sampler": Field(), "pruner": Field(),
    "trials": Field(((lambda v: is_count(v, 1), "must be a positive integer, got {value!r}"),)),
    "max_retry": Field(((lambda v: is_count(v, 0), "must be a whole number, 0 or more, got {value!r}"),)),
    "seeds": Field(),
    "budget": Field(mapping=True, entry=budget_problem),
}


def check_fields(data) -> None:
    """A mapping of known keys, each value meeting its field's rules."""
    if not isinstance(data, dict):
        raise BenchError(f"a spec is a mapping with keys {', '.join(FIELDS)}", ())
    for key in data:
        if key not in FIELDS:
            raise BenchError(f"unknown key; known: {', '.join(FIELDS)}", (key,))
    for key, field in ((key, FIELDS[key]) for key in FIELDS if key in data):
        value = data[key]
        for valid, problem in field.rules:
            if not valid(value):
                raise BenchError(problem.format(value=value, length=len(str(value).strip())), (key,))
        if field.mapping and value and not isinstance(value, dict):
            raise BenchError("must be a mapping of name: value", (key,))
        for name, entry in (value or {}).items() if field.entry else ():
            if problem := field.entry((key, name), entry):
                raise BenchError(problem, (key, name))


class Source:
    """The spec file's composed YAML nodes as the line of every key path in it (the node marks): where an error
    about a key (BenchError.key) points."""

    def __init__(self, path: Path, root: yaml.Node | None):
        self.path, self.lines = path, {}
        self.add_lines(root, ())

    def add_lines(self, node: yaml.Node | None, keys: tuple) -> None:
        """The lines of the keys under `node`; a key given twice in one mapping is an error."""
        if isinstance(node, yaml.MappingNode):
            children = [(key.value, key, value) for key, value in node.value]
        elif isinstance(node, yaml.SequenceNode):
            children = [(index, item, item) for index, item in enumerate(node.value)]
        else:
            return
        for name, marked, value in children:
            path = (*keys, str(name))
            if path in self.lines:
                raise BenchError(f"{self.path}, line {marked.start_mark.line + 1}, {'.'.join(path)}: given twice")
            self.lines[path] = marked.start_mark.line + 1
            self.add_lines(value, path)

    def locate(self, error: BenchError) -> BenchError:
        """`error` (its key a path of spec keys) as the file, line and key path it is about: the line of the
        longest part of the path that the file holds."""
        path = tuple(map(str, error.key))
        line = next((self.lines[path[:n]] for n in range(len(path), 0, -1) if path[:n] in self.lines), 1)
        where, name = f"{self.path}, line {line}", ".".join(path)
        return BenchError(f"{where}, {name}: {error}" if name else f"{where}: {error}")


def parse_yaml(path: Path) -> tuple[object, Source]:
    if not path.is_file():
        raise BenchError(f"no sweep spec at {path}")
    root = compose(read_utf8(path), str(path))
    return construct(root, str(path)), Source(path, root)
