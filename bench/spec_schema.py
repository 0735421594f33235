"""The sweep spec's schema: each key (README "Sweeps" says what it means) and the rules its value alone must
meet, a table (FIELDS), and the values that are schemas of their own: a searched parameter's distribution, a
grid's values, a sampler's or pruner's options (their types read from Optuna's signatures). A failed rule is
a BenchError carrying the key path it is about; bench.sweep_spec checks what depends on several keys."""

from __future__ import annotations

import inspect
import itertools
import math

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from bench.errors import BenchError

STUDY_NAME_LENGTH = 512  # Optuna's studies.study_name column (String(512)); PostgreSQL refuses a longer one
BUDGET = {"epochs": "max_epochs", "minutes": "max_minutes"}
OWN_KEYS = {"corpus": "corpus", "max_epochs": "budget.epochs", "max_minutes": "budget.minutes"}
PARAM_TYPES = ("float", "log-float", "int", "log-int", "categorical")
CONFIGURATION = "configuration"  # the grid parameter of a union-of-products grid
OPTION_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str}  # a sampler's or pruner's options


def check(valid, problem: str, key: tuple) -> None:
    """A rule of the spec: unless `valid`, the BenchError `problem` about the key path `key`."""
    if not valid:
        raise BenchError(problem, key)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_count(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


MAPPING = (lambda v: not v or isinstance(v, dict), "must be a mapping of name: value")
FIELDS = {  # key: the rules its value must meet, in order: (valid, the error otherwise)
    "study": ((lambda v: isinstance(v, str) and bool(v.strip()), "must be a non-empty name"),
              (lambda v: len(v.strip()) <= STUDY_NAME_LENGTH,
               f"must be at most {STUDY_NAME_LENGTH} characters (Optuna's column), got {{length}}")),
    "model": (), "corpus": (), "metric": (),
    "direction": ((lambda v: v in ("minimize", "maximize"), "must be minimize or maximize, got {value!r}"),),
    "project": ((lambda v: v is None or (isinstance(v, str) and v != ""), "must be a W&B project name"),),
    "fixed": (MAPPING,), "search": (MAPPING,), "grid": (), "sampler": (), "pruner": (),
    "trials": ((lambda v: is_count(v, 1), "must be a positive integer, got {value!r}"),),
    "max_retry": ((lambda v: is_count(v, 0), "must be a whole number, 0 or more, got {value!r}"),),
    "seeds": (), "budget": (MAPPING,),
}
ENTRIES = {  # key: the rules each entry of its mapping must meet: (valid(name, value), the error otherwise)
    "fixed": ((lambda k, _: k not in OWN_KEYS, "set it as {own}"),
              (lambda k, _: k != "model", "set the model with the top-level key model")),
    "budget": ((lambda k, _: k in BUDGET, f"unknown budget; known: {', '.join(BUDGET)}"),
               (lambda _, v: is_number(v) and v > 0, "must be a positive number, got {value!r}")),
}


def check_fields(data) -> None:
    """A mapping of known keys, each value meeting its field's rules."""
    check(isinstance(data, dict), f"a spec is a mapping with keys {', '.join(FIELDS)}", ())
    for key in data:
        check(key in FIELDS, f"unknown key; known: {', '.join(FIELDS)}", (key,))
    for key, value in ((key, data[key]) for key in FIELDS if key in data):
        for valid, problem in FIELDS[key]:
            check(valid(value), problem.format(value=value, length=len(str(value).strip())), (key,))
        for name, entry in (value or {}).items() if key in ENTRIES else ():
            for valid, problem in ENTRIES[key]:
                check(valid(name, entry), problem.format(value=entry, own=OWN_KEYS.get(name)), (key, name))


def read_search(data: dict) -> dict[str, BaseDistribution]:
    return {name: distribution(check_parameter(("search", name), data), value)
            for name, value in (data.get("search") or {}).items()}


def distribution(key: tuple, value) -> BaseDistribution:
    """A searched parameter's: a list of choices, or a mapping {type, low, high[, step]}."""
    if isinstance(value, list):
        value = {"type": "categorical", "choices": value}
    check(isinstance(value, dict), "a list of choices, or a mapping {type, low, high[, step]}; fixed values go "
          "under fixed", key)
    kind = value.get("type")
    check(kind in PARAM_TYPES, f"type must be one of {', '.join(PARAM_TYPES)}, got {kind!r}", (*key, "type"))
    allowed = ("type", "choices") if kind == "categorical" else ("type", "low", "high", "step")
    for option in value:
        check(option in allowed, f"unknown option for {kind}; known: {', '.join(allowed)}", (*key, option))
    if kind == "categorical":
        return CategoricalDistribution(check_values((*key, "choices"), value.get("choices")))
    for bound in ("low", "high"):
        check(is_number(value.get(bound)), f"{bound} must be a number, got {value.get(bound)!r}", (*key, bound))
    low, high, step = value["low"], value["high"], value.get("step")
    log, integer = kind.startswith("log-"), kind.endswith("int")
    check(step is None or is_number(step) and not log, "step must be a number, and log types take no step",
          (*key, "step"))
    check(not integer or all(isinstance(v, int) for v in (low, high, step or 1)),
          f"bad range: {kind} bounds and step must be integers", key)
    try:  # Optuna's checks: low <= high, log needs low > 0, ...
        return (IntDistribution(low, high, log=log, step=step or 1) if integer else
                FloatDistribution(float(low), float(high), log=log, step=step))
    except ValueError as error:
        raise BenchError(f"bad range: {str(error).splitlines()[0]}", key) from None


def check_values(key: tuple, values, problem: str = "must be a non-empty list") -> list:
    """A non-empty list of scalars (a parameter's choices or grid values)."""
    check(isinstance(values, list) and values, problem, key)
    for index, item in enumerate(values):
        check(item is None or isinstance(item, (str, int, float, bool)),
              f"values must be numbers, strings or booleans, got {item!r}", (*key, index))
    return values


def check_parameter(key: tuple, data: dict) -> tuple:
    """`key`, a searched or grid parameter's, when the spec sets that parameter nowhere else."""
    check(key[-1] not in OWN_KEYS, f"set it as {OWN_KEYS.get(key[-1])}", key)
    check(key[-1] not in (data.get("fixed") or {}), "is also fixed; give it in one place", key)
    return key


def read_grid(data: dict) -> tuple[dict[str, list], dict[str, dict]]:
    """The GridSampler's search space and, of a union of products, each configuration's settings. `seeds:` (a
    count n is 0..n-1) repeats every point; a search takes none (it would pick among seeds as among settings)."""
    grid, seeds = data.get("grid"), data.get("seeds")
    check(seeds is None or "grid" in data, "seeds repeat the points of a grid; a search picks settings (run the one "
          "it finds with `bench train --seeds N`)", ("seeds",))
    seeds = list(range(seeds)) if is_count(seeds, 1) else seeds
    check(seeds is None or isinstance(seeds, list) and seeds and all(is_count(seed, 0) for seed in seeds) and len(
        set(seeds)) == len(seeds), f"a count, or a list of distinct non-negative seeds, got {seeds!r}", ("seeds",))
    if grid is None:
        return {}, {}
    products = grid if isinstance(grid, list) else [grid]
    check(seeds is None or not any(isinstance(p, dict) and "seed" in p for p in products),
          "the grid sets seed itself; give the seeds in one place", ("seeds",))
    products = [{**p, "seed": seeds} if isinstance(p, dict) and seeds is not None else p for p in products]
    check(products and all(isinstance(p, dict) and p for p in products),
          "a mapping of parameter: [values], or a list of such mappings", ("grid",))
    for index, product in enumerate(products):
        for name, values in product.items():
            key = check_parameter(("grid", index, name) if isinstance(grid, list) else ("grid", name), data)
            check_values(key, values, "must be a non-empty list of values")
    if not isinstance(grid, list):
        return dict(products[0]), {}
    points = {}
    for product in products:
        for point in (dict(zip(product, values)) for values in itertools.product(*product.values())):
            points.setdefault(" ".join(f"{k}={v}" for k, v in point.items()), point)
    return {CONFIGURATION: list(points)}, points


def read_choice(data: dict, key: str, choices: dict, default: str) -> tuple[str, dict]:
    """A sampler's or pruner's name and options, each option of a type its Optuna signature takes (a number,
    a flag, a name: Optuna would store a wrong one and fail every trial with it), counts and seeds not negative.
    The types are read by name, `int | None` -> ["int", "None"]: Optuna's modules postpone their annotations."""
    value, options = data.get(key, default), {}
    if isinstance(value, dict):
        value, options = value.get("type"), {k: v for k, v in value.items() if k != "type"}
    check(isinstance(value, str) and value in choices, f"choose one of {', '.join(choices)}, got {value!r}", (key,))
    settable = {name: [kind.strip() for kind in str(getattr(p.annotation, "__name__", p.annotation)).split("|")]
                for name, p in inspect.signature(choices[value]).parameters.items()
                if name not in ("self", "search_space") and p.kind is not p.VAR_KEYWORD}
    for name, option in options.items():
        check(name in settable, f"unknown option; known: {', '.join(settable)}", (key, name))
        kinds = [kind for kind in settable[name] if kind in OPTION_TYPES]
        check(kinds, "cannot be set in a spec (Optuna takes a function)", (key, name))
        check(option is None and "None" in settable[name] or any(isinstance(option, OPTION_TYPES[kind]) and (
            kind == "bool") == isinstance(option, bool) for kind in kinds),
              f"must be {' or '.join(settable[name])}, got {option!r}", (key, name))
        check(not is_number(option) or option >= 0 and math.isfinite(option), f"must not be negative, got {option!r}",
              (key, name))
    return value, options
