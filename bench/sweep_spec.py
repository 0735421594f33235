"""Sweep specs (sweeps/*.yaml): read, check whole, and turn into the samplers, pruners and configs of a study.

A grid is a mapping of lists (their product, Optuna's GridSampler over those parameters) or a list of such
mappings (the union of their products; the GridSampler then runs over one parameter, "configuration", whose
values name the points). Everything is checked on load, before a study is opened: each key's value
(bench.spec_schema), then every configuration the spec can produce -- each grid point, each combination of the
search space's bounds and choices -- through bench.config.make_config. A mistake is a BenchError carrying the
spec key it is about, which load_spec turns into the file, the line and the key.
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from bench.config import make_config
from bench.errors import BenchError
from bench.models.output_layers import check_fits_vocabulary
from bench.models.plugins import model_names, model_spec
from bench.spec_schema import BUDGET, check_fields, is_count, is_number, own_key_problem, parse_yaml
from bench.store import MAX_RETRY
from bench.tasks import LANGUAGE_MODEL, TASKS

SAMPLERS = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
            "grid": optuna.samplers.GridSampler}
PRUNERS = {"median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner,
           "none": optuna.pruners.NopPruner}
PARAM_TYPES = ("float", "log-float", "int", "log-int", "categorical")
OPTION_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str}  # a sampler's or pruner's options
CONFIGURATION = "configuration"  # the grid parameter of a union-of-products grid


@dataclass(frozen=True)
class SweepSpec:
    path: str
    study: str
    model: str | None  # None: the grid or the search space chooses it
    corpus: str
    task: str
    metric: str
    direction: str
    project: str | None
    fixed: dict
    budget: dict  # harness keys: max_epochs, max_minutes
    search: dict[str, BaseDistribution] = field(default_factory=dict)
    grid_space: dict[str, list] = field(default_factory=dict)  # GridSampler's search space
    grid_points: dict[str, dict] = field(default_factory=dict)  # configuration name -> its settings
    sampler: str = "tpe"
    sampler_options: dict = field(default_factory=dict)
    pruner: str = "median"
    pruner_options: dict = field(default_factory=dict)
    trials: int = 20
    max_retry: int = MAX_RETRY
    definition: str = ""  # the spec less `trials`, `project` and `max_retry`, canonical JSON (see same_study)

    @property
    def epoch_metric(self) -> str:
        return TASKS[self.task].monitor

    @property
    def grid_size(self) -> int | None:
        return math.prod(map(len, self.grid_space.values())) if self.grid_space else None

    def settings(self, trial: optuna.trial.BaseTrial) -> dict:
        """The trial's hyper-parameters (model included) drawn from the search space or the grid."""
        chosen = {name: suggest(trial, name, distribution) for name, distribution in self.search.items()}
        for name, values in self.grid_space.items():
            value = trial.suggest_categorical(name, values)
            chosen.update(self.grid_points[value] if name == CONFIGURATION else {name: value})
        return chosen

    def config(self, settings: dict) -> dict:
        """The validated run configuration (bench.config.make_config) of one trial's settings."""
        settings = dict(settings)
        model = settings.pop("model", self.model)
        return make_config(model, {"corpus": self.corpus, **self.fixed, **self.budget, **settings})

    def make_sampler(self, seed_salt: tuple = ()) -> optuna.samplers.BaseSampler:
        """The spec's sampler. A `seed` option of tpe/random is mixed with `seed_salt` (the trials done so
        far, the worker) so a resumed study or a second worker does not replay the same draws. The grid
        sampler's seed orders the grid and must be the same in every worker (a trial's number picks its point)."""
        options = dict(self.sampler_options)
        if options.get("seed") is not None and seed_salt and self.sampler != "grid":
            options["seed"] = int(np.random.SeedSequence([options["seed"], *seed_salt]).generate_state(1)[0])
        if self.sampler == "grid":
            return optuna.samplers.GridSampler(self.grid_space, **options)
        return SAMPLERS[self.sampler](**options)

    def make_pruner(self) -> optuna.pruners.BasePruner:
        return PRUNERS[self.pruner](**self.pruner_options)


def suggest(trial: optuna.trial.BaseTrial, name: str, distribution: BaseDistribution):
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    suggest_number = trial.suggest_int if isinstance(distribution, IntDistribution) else trial.suggest_float
    return suggest_number(name, distribution.low, distribution.high, step=distribution.step, log=distribution.log)


def load_spec(path: str | Path, vocab_size: int | None = None) -> SweepSpec:
    """Read and check the spec at `path` (BenchError: what is wrong, with file, line and key); with the
    corpus's `vocab_size`, also the settings that depend on it (class counts, adaptive cutoffs)."""
    path = Path(path)
    data, source = parse_yaml(path)
    try:
        return read_spec(data, path, vocab_size)
    except BenchError as error:
        if error.key is None:
            raise
        raise source.locate(error) from None


def same_study(stored: str, definition: str) -> bool:
    """Whether a stored study's definition and a spec's describe one study. The pruner may change on resume:
    it decides when to stop a trial, not what a trial is, and a study can learn it was too eager: under the
    rnnlm schedule the early epochs rank recipes badly (tune-rnn-bptt-ptb's best trial was at valid 340 after
    two epochs, against 301, and ended at 150, against 178). Studies stored before this rule hold a pruner."""
    def identity(text: str) -> dict:
        return {k: v for k, v in json.loads(text).items() if k != "pruner"}
    return identity(stored) == identity(definition)


def read_spec(data, path: Path, vocab_size: int | None) -> SweepSpec:
    check_fields(data)
    space = read_space(data)
    task = TASKS[space["task"]]
    spec = SweepSpec(path=str(path), study=data.get("study", path.stem).strip(), model=data.get("model"),
                     corpus=data.get("corpus", "synthetic"), fixed=data.get("fixed") or {},
                     budget={BUDGET[k]: v for k, v in (data.get("budget") or {}).items()}, **space,
                     metric=data.get("metric", task.metric), direction=data.get("direction", task.direction),
                     project=data.get("project"), max_retry=data.get("max_retry", MAX_RETRY),
                     definition=json.dumps({k: v for k, v in data.items()
                                            if k not in ("trials", "project", "max_retry")}, sort_keys=True))
    configs = check_configs(spec, data, vocab_size)
    if spec.metric not in task.sweep_metrics:
        raise BenchError(f"choose one of {', '.join(task.sweep_metrics)} (validation figures of {task.name} "
                         f"records), got {spec.metric!r}", ("metric",))
    if spec.metric in task.kn_metrics and not all(c.get("kn_order") for c in configs):
        raise BenchError(f"{spec.metric} needs kn_order > 0 in every trial (fixed: kn_order: 5)", ("metric",))
    sampler, sampler_options = read_choice(data, "sampler", SAMPLERS, "grid" if spec.grid_space else "tpe")
    pruner, pruner_options = read_choice(data, "pruner", PRUNERS, "none" if spec.grid_space else "median")
    if (sampler == "grid") != bool(spec.grid_space):
        raise BenchError("the grid sampler runs a grid (grid:); a search space needs tpe or random", ("sampler",))
    if pruner != "none" and spec.metric != task.metric:
        raise BenchError(f"the pruner watches {task.monitor} every epoch, so it needs metric {task.metric}; set "
                         f"pruner: none", ("pruner",))
    trials = data.get("trials", spec.grid_size or 20)
    if spec.grid_size is not None and trials > spec.grid_size:
        raise BenchError(f"the grid has {spec.grid_size} points; a grid study runs at most that many", ("trials",))
    spec = replace(spec, sampler=sampler, sampler_options=sampler_options, pruner=pruner,
                   pruner_options=pruner_options, trials=trials)
    for key, make in (("sampler", spec.make_sampler), ("pruner", spec.make_pruner)):
        try:  # Optuna's own checks of the options
            make()
        except (TypeError, ValueError) as error:
            raise BenchError(str(error).splitlines()[0], (key,)) from None
    return spec


def read_space(data: dict) -> dict:
    """The search space or the grid, and the task of the models they and `model` name."""
    if data.get("model") is not None:
        check_model(("model",), data["model"])
    search = {name: distribution(check_parameter(("search", name), data), value)
              for name, value in (data.get("search") or {}).items()}
    grid_space, grid_points = read_grid(data)
    if search and grid_space:
        raise BenchError("give a search space or a grid, not both", ("grid",))
    if not search and not grid_space:
        raise BenchError("give a search space (search:) or a grid (grid:)", ())
    tasks = {model_spec(m).task for m in models(data.get("model"), search, grid_space, grid_points)}
    if len(tasks) > 1:
        raise BenchError(f"models of different tasks ({', '.join(sorted(tasks))}) in one study", ("model",))
    return dict(search=search, grid_space=grid_space, grid_points=grid_points, task=tasks.pop())


def check_parameter(key: tuple, data: dict) -> tuple:
    """`key`, a searched or grid parameter's, when the spec sets that parameter nowhere else."""
    if problem := own_key_problem(key):
        raise BenchError(problem, key)
    if key[-1] in (data.get("fixed") or {}):
        raise BenchError("is also fixed; give it in one place", key)
    return key


def distribution(key: tuple, value) -> BaseDistribution:
    if isinstance(value, list):
        value = {"type": "categorical", "choices": value}
    if not isinstance(value, dict):
        raise BenchError("a list of choices, or a mapping {type, low, high[, step]}; fixed values go under fixed", key)
    kind = value.get("type")
    if kind not in PARAM_TYPES:
        raise BenchError(f"type must be one of {', '.join(PARAM_TYPES)}, got {kind!r}", (*key, "type"))
    allowed = ("type", "choices") if kind == "categorical" else ("type", "low", "high", "step")
    for option in value:
        if option not in allowed:
            raise BenchError(f"unknown option for {kind}; known: {', '.join(allowed)}", (*key, option))
    if kind == "categorical":
        choices = check_values((*key, "choices"), value.get("choices"), "must be a non-empty list")
        return CategoricalDistribution(choices)
    for bound in ("low", "high"):
        if not is_number(value.get(bound)):
            raise BenchError(f"{bound} must be a number, got {value.get(bound)!r}", (*key, bound))
    low, high, step, log = value["low"], value["high"], value.get("step"), kind.startswith("log-")
    if step is not None and (not is_number(step) or log):
        raise BenchError("step must be a number, and log types take no step", (*key, "step"))
    try:
        if kind.endswith("int"):
            if not all(isinstance(v, int) for v in (low, high, step or 1)):
                raise ValueError(f"{kind} bounds and step must be integers")
            return IntDistribution(low, high, log=log, step=step or 1)
        return FloatDistribution(float(low), float(high), log=log, step=step)
    except ValueError as error:  # Optuna's checks: low <= high, log needs low > 0, ...
        raise BenchError(f"bad range: {str(error).splitlines()[0]}", key) from None


def check_values(key: tuple, values, problem: str) -> list:
    """A non-empty list of scalars (a parameter's choices or grid values)."""
    if not isinstance(values, list) or not values:
        raise BenchError(problem, key)
    for index, item in enumerate(values):
        if not (item is None or isinstance(item, (str, int, float, bool))):
            raise BenchError(f"values must be numbers, strings or booleans, got {item!r}", (*key, index))
    return values


def read_seeds(data: dict) -> list[int] | None:
    """`seeds:` as a list of seeds (a count n is 0..n-1); only a grid repeats its points over seeds (a search
    would pick among seeds as if they were settings)."""
    seeds = data.get("seeds")
    if seeds is not None and "grid" not in data:
        raise BenchError("seeds repeat the points of a grid; a search picks settings (run the one it finds with "
                         "`bench train --seeds N`)", ("seeds",))
    if seeds is None or isinstance(seeds, list) and seeds and len(set(seeds)) == len(seeds) and all(
            is_count(seed, 0) for seed in seeds):
        return seeds
    if is_count(seeds, 1):
        return list(range(seeds))
    raise BenchError(f"a count, or a list of distinct non-negative seeds, got {seeds!r}", ("seeds",))


def read_grid(data: dict) -> tuple[dict[str, list], dict[str, dict]]:
    grid, seeds = data.get("grid"), read_seeds(data)
    if grid is None:
        return {}, {}
    products = grid if isinstance(grid, list) else [grid]
    if seeds is not None and any(isinstance(p, dict) and "seed" in p for p in products):
        raise BenchError("the grid sets seed itself; give the seeds in one place", ("seeds",))
    products = [{**p, "seed": seeds} if isinstance(p, dict) and seeds is not None else p for p in products]
    if not products or not all(isinstance(p, dict) and p for p in products):
        raise BenchError("a mapping of parameter: [values], or a list of such mappings", ("grid",))
    for index, product in enumerate(products):
        for name, values in product.items():
            key = check_parameter(("grid", index, name) if isinstance(grid, list) else ("grid", name), data)
            check_values(key, values, "must be a non-empty list of values")
    if not isinstance(grid, list):
        return dict(products[0]), {}
    points = {}
    for product in products:
        for combination in itertools.product(*product.values()):
            point = dict(zip(product, combination))
            points.setdefault(" ".join(f"{k}={v}" for k, v in point.items()), point)
    return {CONFIGURATION: list(points)}, points


def models(model, search: dict, grid_space: dict, grid_points: dict) -> list[str]:
    if "model" in search or "model" in grid_space:
        key = ("search", "model") if "model" in search else ("grid", "model")
        if model is not None:
            raise BenchError(f"the model is chosen by {key[0]}; drop model:", ("model",))
        candidates = list(search["model"].choices) if "model" in search else grid_space["model"]
    elif grid_points:
        key, candidates = ("grid",), [point.get("model", model) for point in grid_points.values()]
    else:
        key, candidates = ("model",), [model]
    for candidate in candidates:
        if candidate is None:
            raise BenchError("no model: give model: (or a model in the grid)", key)
        check_model(key, candidate)
    return sorted(set(candidates))


def check_model(key: tuple, model) -> None:
    """A model name the suite can run: built-in, an installed plugin, or a loadable module.path:ClassName."""
    if not isinstance(model, str):
        raise BenchError(f"a model is a name, got {model!r}; choose one of {', '.join(model_names())}", key)
    try:
        model_spec(model)
    except BenchError as error:
        raise BenchError(str(error), key) from None


def check_configs(spec: SweepSpec, data: dict, vocab_size: int | None) -> list[dict]:
    """The configuration of every grid point, or of every combination of the search space's bounds and
    choices (with the corpus's vocabulary, the output layers' settings checked too); an error is located at
    the spec key that gave the hyper-parameter it names."""
    values = spec.grid_space or {name: list(d.choices) if isinstance(d, CategoricalDistribution) else
                                 [d.low, d.high] for name, d in spec.search.items()}
    points = list(spec.grid_points.values()) or [dict(zip(values, c)) for c in itertools.product(*values.values())]
    configs = []
    for point in points:
        try:
            configs.append(spec.config(point))
            if vocab_size is not None and spec.task == LANGUAGE_MODEL.name:
                check_fits_vocabulary(configs[-1], vocab_size)
        except BenchError as error:
            raise BenchError(f"{error} (in the configuration {point})", spec_key(error.key, point, data)) from None
    return configs


def spec_key(name: str | None, point: dict, data: dict) -> tuple:
    """The spec key that set the configuration's hyper-parameter `name` (else the grid's, or the model's)."""
    if name == "corpus":
        return ("corpus",)
    budget = {harness: key for key, harness in BUDGET.items()}
    if name in budget and budget[name] in (data.get("budget") or {}):
        return ("budget", budget[name])
    for section in ("fixed", "search"):
        if name in (data.get(section) or {}):
            return (section, name)
    if name in point and isinstance(data.get("grid"), dict):
        return ("grid", name)
    return ("grid",) if "grid" in data else ("model",)


def read_choice(data: dict, key: str, choices: dict, default: str) -> tuple[str, dict]:
    """A sampler's or pruner's name and options, each option of a type its Optuna signature takes (a number,
    a flag, a name: Optuna would store a wrong one and fail every trial with it), counts and seeds not negative."""
    value, options = data.get(key, default), {}
    if isinstance(value, dict):
        value, options = value.get("type"), {k: v for k, v in value.items() if k != "type"}
    if value not in choices:
        raise BenchError(f"choose one of {', '.join(choices)}, got {value!r}", (key,))
    settable = {name: type_names(p.annotation) for name, p in inspect.signature(choices[value]).parameters.items()
                if name not in ("self", "search_space") and p.kind is not p.VAR_KEYWORD}
    for name, option in options.items():
        kinds = settable.get(name)
        if kinds is None:
            raise BenchError(f"unknown option; known: {', '.join(settable)}", (key, name))
        if not any(kind in OPTION_TYPES for kind in kinds):
            raise BenchError("cannot be set in a spec (Optuna takes a function)", (key, name))
        if not (option is None and "None" in kinds or any(
                isinstance(option, OPTION_TYPES[kind]) and (kind == "bool") == isinstance(option, bool)
                for kind in kinds if kind in OPTION_TYPES)):
            raise BenchError(f"must be {' or '.join(kinds)}, got {option!r}", (key, name))
        if is_number(option) and (option < 0 or not math.isfinite(option)):
            raise BenchError(f"must not be negative, got {option!r}", (key, name))
    return value, options


def type_names(annotation) -> list[str]:
    """The types an annotation allows, by name: `int | None` -> ["int", "None"] (Optuna's modules postpone
    their annotations: most are strings)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return [name.strip() for name in text.split("|")]
