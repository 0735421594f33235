"""Sweep specs (sweeps/*.yaml): read, check whole, and turn into the samplers, pruners and configs of a study.

A spec names the study, the model and corpus, the metric and its direction, fixed hyper-parameters, either a
search space (float / log-float / int / log-int / categorical) or a grid, the sampler, the pruner, the number
of trials and each trial's budget (see SPEC_KEYS and README "Sweeps"). A grid is a mapping of lists (their
cartesian product, Optuna's GridSampler over those parameters) or a list of such mappings (the union of
their products: configurations that are not one product, e.g. class counts plus the full softmax; the
GridSampler then runs over one parameter, "configuration", whose values name the points).

Everything is checked on load, before a study is opened: every configuration the spec can produce -- each
grid point, each combination of the search space's bounds and choices -- goes through
bench.config.make_config. A mistake is a BenchError naming the file, the line (yaml's composed nodes carry
start_mark) and the key.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from bench.config import make_config
from bench.errors import BenchError
from bench.inputs import compose, construct, read_utf8
from bench.models.output_layers import check_fits_vocabulary
from bench.models.plugins import model_names, model_spec
from bench.tasks import TASKS

SPEC_KEYS = {
    "study": "study name (default: the file name)",
    "model": "model name, or a plugin class as module.path:ClassName (or give `model` in the grid)",
    "corpus": "corpus name",
    "metric": "record figure to optimise (default: valid_ppl; valid_f1 for taggers)",
    "direction": "minimize or maximize (default: the metric's)",
    "project": "W&B project (default: $WANDB_PROJECT, else bench)",
    "fixed": "hyper-parameters every trial uses",
    "search": "parameter -> list of choices, or {type, low, high[, step]} / {type: categorical, choices}",
    "grid": "parameter -> list of values, or a list of such mappings",
    "sampler": "tpe, random or grid, or {type: ..., Optuna options}",
    "pruner": "median, hyperband or none, or {type: ..., Optuna options}",
    "trials": "trials in the study in total",
    "seeds": "with a grid: run every grid point with each of these seeds (a count n: seeds 0..n-1)",
    "budget": "per trial: {epochs, minutes}",
}
SAMPLERS = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
            "grid": optuna.samplers.GridSampler}
PRUNERS = {"median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner,
           "none": optuna.pruners.NopPruner}
PARAM_TYPES = ("float", "log-float", "int", "log-int", "categorical")
BUDGET = {"epochs": "max_epochs", "minutes": "max_minutes"}
STUDY_NAME_LENGTH = 512  # Optuna's studies.study_name column (String(512)); PostgreSQL refuses a longer one
OPTION_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str}  # a sampler's or pruner's options
CONFIGURATION = "configuration"  # the grid parameter of a union-of-products grid
OWN_KEYS = {"corpus": "corpus", "max_epochs": "budget.epochs", "max_minutes": "budget.minutes"}


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
    definition: str = ""  # the spec's content less `trials` and `project`, canonical JSON: a study's identity

    @property
    def epoch_metric(self) -> str:
        return TASKS[self.task].monitor

    @property
    def grid_size(self) -> int | None:
        return len(list(itertools.product(*self.grid_space.values()))) if self.grid_space else None

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
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high, step=distribution.step,
                                 log=distribution.log)
    return trial.suggest_float(name, distribution.low, distribution.high, step=distribution.step,
                               log=distribution.log)


# ------------------------------------------------------------------------------------------------ reading


class Source:
    """The spec file's composed YAML nodes: which line a key is on, and errors that say so."""

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

    def error(self, keys: tuple, message: str) -> BenchError:
        where = f"{self.path}, line {self.line(keys)}"
        name = ".".join(map(str, keys))
        return BenchError(f"{where}, {name}: {message}" if name else f"{where}: {message}")

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


def load_spec(path: str | Path, vocab_size: int | None = None) -> SweepSpec:
    """Read and check the spec at `path` (BenchError: what is wrong, with file, line and key); with the
    corpus's `vocab_size`, also the settings that depend on it (class counts, adaptive cutoffs)."""
    path = Path(path)
    data, source = parse_yaml(path)
    if not isinstance(data, dict):
        raise source.error((), f"a spec is a mapping with keys {', '.join(SPEC_KEYS)}")
    for key in data:
        if key not in SPEC_KEYS:
            raise source.error((key,), f"unknown key; known: {', '.join(SPEC_KEYS)}")
    return SpecReader(data, source, path, vocab_size).read()


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class SpecReader:
    """Checks one parsed spec, section by section, and builds its SweepSpec."""

    def __init__(self, data: dict, source: Source, path: Path, vocab_size: int | None = None):
        self.data, self.source, self.path, self.vocab_size = data, source, path, vocab_size

    def fail(self, keys: tuple, message: str) -> BenchError:
        return self.source.error(keys, message)

    def mapping(self, key: str) -> dict:
        value = self.data.get(key) or {}
        if not isinstance(value, dict):
            raise self.fail((key,), "must be a mapping of name: value")
        return value

    def read(self) -> SweepSpec:
        data = self.data
        study = data.get("study", self.path.stem)
        if not isinstance(study, str) or not study.strip():
            raise self.fail(("study",), "must be a non-empty name")
        if len(study.strip()) > STUDY_NAME_LENGTH:
            raise self.fail(("study",), f"must be at most {STUDY_NAME_LENGTH} characters (Optuna's column), got "
                                        f"{len(study.strip())}")
        corpus = data.get("corpus", "synthetic")  # checked with the configurations (corpora depend on the task)
        model = data.get("model")
        if model is not None:
            self.check_model(("model",), model)
        fixed, budget = self.read_fixed(), self.read_budget()
        search = self.read_search()
        grid_space, grid_points = self.read_grid()
        if search and grid_space:
            raise self.fail(("grid",), "give a search space or a grid, not both")
        if not search and not grid_space:
            raise self.fail((), "give a search space (search:) or a grid (grid:)")
        models = self.models(model, search, grid_space, grid_points)
        tasks = {model_spec(m).task for m in models}
        if len(tasks) > 1:
            raise self.fail(("model",), f"models of different tasks ({', '.join(sorted(tasks))}) in one study")
        task = tasks.pop()
        spec = SweepSpec(path=str(self.path), study=study.strip(), model=model, corpus=corpus, task=task,
                         metric="", direction="", project=self.read_project(), fixed=fixed, budget=budget,
                         search=search, grid_space=grid_space, grid_points=grid_points)
        metric, direction = self.read_metric(task, self.check_configs(spec))
        sampler, sampler_options = self.read_choice("sampler", SAMPLERS, "grid" if grid_space else "tpe")
        pruner, pruner_options = self.read_choice("pruner", PRUNERS, "none" if grid_space else "median")
        self.check_options("sampler", SAMPLERS[sampler], sampler_options)
        self.check_options("pruner", PRUNERS[pruner], pruner_options)
        if (sampler == "grid") != bool(grid_space):
            raise self.fail(("sampler",), "the grid sampler runs a grid (grid:); a search space needs tpe or random")
        if pruner != "none" and metric != TASKS[task].metric:
            raise self.fail(("pruner",), f"the pruner watches {TASKS[task].monitor} every epoch, so it needs "
                                         f"metric {TASKS[task].metric}; set pruner: none")
        definition = {k: v for k, v in self.data.items() if k not in ("trials", "project")}
        spec = dataclasses.replace(
            spec, metric=metric, direction=direction, sampler=sampler, sampler_options=sampler_options,
            pruner=pruner, pruner_options=pruner_options, trials=self.read_trials(spec.grid_size),
            definition=json.dumps(definition, sort_keys=True))
        for key, make in (("sampler", spec.make_sampler), ("pruner", spec.make_pruner)):
            try:  # Optuna's own checks of the options
                make()
            except (TypeError, ValueError) as error:
                raise self.fail((key,), str(error).splitlines()[0]) from None
        return spec

    # ------------------------------------------------------------------------------------------ sections

    def read_fixed(self) -> dict:
        fixed = self.mapping("fixed")
        for key in fixed:
            self.check_own_key(("fixed", key))
        return fixed

    def check_own_key(self, keys: tuple) -> None:
        name = keys[-1]
        if name in OWN_KEYS:
            raise self.fail(keys, f"set it as {OWN_KEYS[name]}")
        if name == "model" and keys[0] == "fixed":
            raise self.fail(keys, "set the model with the top-level key model")

    def read_budget(self) -> dict:
        budget = self.mapping("budget")
        for key, value in budget.items():
            if key not in BUDGET:
                raise self.fail(("budget", key), f"unknown budget; known: {', '.join(BUDGET)}")
            if not _is_number(value) or value <= 0:
                raise self.fail(("budget", key), f"must be a positive number, got {value!r}")
        return {BUDGET[key]: value for key, value in budget.items()}

    def read_project(self) -> str | None:
        project = self.data.get("project")
        if project is not None and (not isinstance(project, str) or not project):
            raise self.fail(("project",), "must be a W&B project name")
        return project

    def read_search(self) -> dict[str, BaseDistribution]:
        space = {}
        for name, value in self.mapping("search").items():
            keys = ("search", name)
            self.check_own_key(keys)
            if name in self.mapping("fixed"):
                raise self.fail(keys, "is also fixed; give it in one place")
            space[name] = self.distribution(keys, value)
        return space

    def distribution(self, keys: tuple, value) -> BaseDistribution:
        if isinstance(value, list):
            value = {"type": "categorical", "choices": value}
        if not isinstance(value, dict):
            raise self.fail(keys, "a list of choices, or a mapping {type, low, high[, step]}; fixed values go "
                                  "under fixed")
        kind = value.get("type")
        if kind not in PARAM_TYPES:
            raise self.fail((*keys, "type"), f"type must be one of {', '.join(PARAM_TYPES)}, got {kind!r}")
        allowed = ("type", "choices") if kind == "categorical" else ("type", "low", "high", "step")
        for option in value:
            if option not in allowed:
                raise self.fail((*keys, option), f"unknown option for {kind}; known: {', '.join(allowed)}")
        if kind == "categorical":
            choices = value.get("choices")
            if not isinstance(choices, list) or not choices:
                raise self.fail((*keys, "choices"), "must be a non-empty list")
            self.check_scalars((*keys, "choices"), choices)
            return CategoricalDistribution(choices)
        for bound in ("low", "high"):
            if not _is_number(value.get(bound)):
                raise self.fail((*keys, bound), f"{bound} must be a number, got {value.get(bound)!r}")
        low, high, step, log = value["low"], value["high"], value.get("step"), kind.startswith("log-")
        if step is not None and (not _is_number(step) or log):
            raise self.fail((*keys, "step"), "step must be a number, and log types take no step")
        try:
            if kind.endswith("int"):
                if not all(isinstance(v, int) for v in (low, high, step or 1)):
                    raise ValueError(f"{kind} bounds and step must be integers")
                return IntDistribution(low, high, log=log, step=step or 1)
            return FloatDistribution(float(low), float(high), log=log, step=step)
        except ValueError as error:  # Optuna's checks: low <= high, log needs low > 0, ...
            raise self.fail(keys, f"bad range: {str(error).splitlines()[0]}") from None

    def check_scalars(self, keys: tuple, values: list) -> None:
        for index, item in enumerate(values):
            if not (item is None or isinstance(item, (str, int, float, bool))):
                raise self.fail((*keys, index), f"values must be numbers, strings or booleans, got {item!r}")

    def read_seeds(self) -> list[int] | None:
        """`seeds:` as a list of seeds (a count n is 0..n-1); only a grid repeats its points over seeds (a search
        would pick among seeds as if they were settings)."""
        seeds = self.data.get("seeds")
        if seeds is None:
            return None
        if "grid" not in self.data:
            raise self.fail(("seeds",), "seeds repeat the points of a grid; a search picks settings (run the one it "
                                        "finds with `bench train --seeds N`)")
        if isinstance(seeds, int) and not isinstance(seeds, bool) and seeds >= 1:
            return list(range(seeds))
        if (isinstance(seeds, list) and seeds and len(set(seeds)) == len(seeds)
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in seeds)):
            return seeds
        raise self.fail(("seeds",), f"a count, or a list of distinct non-negative seeds, got {seeds!r}")

    def read_grid(self) -> tuple[dict[str, list], dict[str, dict]]:
        grid, seeds = self.data.get("grid"), self.read_seeds()
        if grid is None:
            return {}, {}
        products = grid if isinstance(grid, list) else [grid]
        if seeds is not None and any(isinstance(p, dict) and "seed" in p for p in products):
            raise self.fail(("seeds",), "the grid sets seed itself; give the seeds in one place")
        if seeds is not None:
            products = [{**p, "seed": seeds} if isinstance(p, dict) else p for p in products]
            grid = products if isinstance(grid, list) else products[0]
        if not products or not all(isinstance(p, dict) and p for p in products):
            raise self.fail(("grid",), "a mapping of parameter: [values], or a list of such mappings")
        for index, product in enumerate(products):
            where = ("grid", index) if isinstance(grid, list) else ("grid",)
            for name, values in product.items():
                self.check_own_key((*where, name))
                if name in self.mapping("fixed"):
                    raise self.fail((*where, name), "is also fixed; give it in one place")
                if not isinstance(values, list) or not values:
                    raise self.fail((*where, name), "must be a non-empty list of values")
                self.check_scalars((*where, name), values)
        if not isinstance(grid, list):
            return dict(grid), {}
        points = {}
        for product in products:
            for combination in itertools.product(*product.values()):
                point = dict(zip(product, combination))
                points.setdefault(" ".join(f"{k}={v}" for k, v in point.items()), point)
        return {CONFIGURATION: list(points)}, points

    def models(self, model, search, grid_space, grid_points) -> list[str]:
        if "model" in search or "model" in grid_space:
            keys = ("search", "model") if "model" in search else ("grid", "model")
            if model is not None:
                raise self.fail(("model",), f"the model is chosen by {keys[0]}; drop model:")
            candidates = list(search["model"].choices) if "model" in search else grid_space["model"]
        elif grid_points:
            keys, candidates = ("grid",), [point.get("model", model) for point in grid_points.values()]
        else:
            keys, candidates = ("model",), [model]
        for candidate in candidates:
            if candidate is None:
                raise self.fail(keys, "no model: give model: (or a model in the grid)")
            self.check_model(keys, candidate)
        return sorted(set(candidates))

    def check_model(self, keys: tuple, model) -> None:
        """A model name the suite can run: built-in, an installed plugin, or a loadable module.path:ClassName."""
        if not isinstance(model, str):
            raise self.fail(keys, f"a model is a name, got {model!r}; choose one of {', '.join(model_names())}")
        try:
            model_spec(model)
        except BenchError as error:
            raise self.fail(keys, str(error)) from None

    def check_configs(self, spec: SweepSpec) -> list[dict]:
        """make_config on every grid point, or every combination of the search space's bounds and choices."""
        if spec.grid_points:
            points = list(spec.grid_points.values())
        elif spec.grid_space:
            points = [dict(zip(spec.grid_space, values)) for values in itertools.product(*spec.grid_space.values())]
        else:
            corners = {name: list(d.choices) if isinstance(d, CategoricalDistribution) else [d.low, d.high]
                       for name, d in spec.search.items()}
            points = [dict(zip(corners, values)) for values in itertools.product(*corners.values())]
        configs = []
        for point in points:
            try:
                configs.append(spec.config(point))
                if self.vocab_size is not None and spec.task == "lm":
                    check_fits_vocabulary(configs[-1], self.vocab_size)
            except BenchError as error:
                raise self.fail(self.culprit(str(error), point), f"{error} (in the configuration {point})") from None
        return configs

    def culprit(self, message: str, point: dict) -> tuple:
        """The spec key a make_config message is about (its messages start with the hyper-parameter)."""
        match = re.match(r"unknown hyper-parameter '([^']+)'|(\w+) ", message)
        name = match and (match[1] or match[2])
        if name == "corpus":
            return ("corpus",)
        budget = {harness: key for key, harness in BUDGET.items()}
        if name in budget and budget[name] in self.mapping("budget"):
            return ("budget", budget[name])
        for section in ("fixed", "search"):
            if name in self.mapping(section):
                return (section, name)
        if name in point and isinstance(self.data.get("grid"), dict):
            return ("grid", name)
        return ("grid",) if "grid" in self.data else ("model",)

    def read_metric(self, task: str, configs: list[dict]) -> tuple[str, str]:
        metric = self.data.get("metric", TASKS[task].metric)
        if metric not in TASKS[task].sweep_metrics:
            raise self.fail(("metric",), f"choose one of {', '.join(TASKS[task].sweep_metrics)} (validation figures of "
                                         f"{task} records), got {metric!r}")
        if metric.startswith("nn_kn") and not all(c.get("kn_order") for c in configs):
            raise self.fail(("metric",), f"{metric} needs kn_order > 0 in every trial (fixed: kn_order: 5)")
        direction = self.data.get("direction", TASKS[task].direction)
        if direction not in ("minimize", "maximize"):
            raise self.fail(("direction",), f"must be minimize or maximize, got {direction!r}")
        return metric, direction

    def read_choice(self, key: str, choices: dict, default: str) -> tuple[str, dict]:
        value = self.data.get(key, default)
        options = {}
        if isinstance(value, dict):
            options = {k: v for k, v in value.items() if k != "type"}
            value = value.get("type")
        if value not in choices:
            raise self.fail((key,), f"choose one of {', '.join(choices)}, got {value!r}")
        return value, options

    def check_options(self, key: str, factory, options: dict) -> None:
        """Each option of a sampler or pruner of a type its Optuna signature takes (a number, a flag, a name):
        Optuna stores a wrong one and fails every trial with it. Its counts and seeds are never negative."""
        parameters = inspect.signature(factory).parameters
        settable = {name: getattr(p.annotation, "__name__", str(p.annotation)) for name, p in parameters.items()
                    if name not in ("self", "search_space") and p.kind is not p.VAR_KEYWORD}
        for name, value in options.items():
            if name not in settable:
                raise self.fail((key, name), f"unknown option; known: {', '.join(settable)}")
            kinds = settable[name].split(" | ")
            if not any(kind in OPTION_TYPES for kind in kinds):
                raise self.fail((key, name), "cannot be set in a spec (Optuna takes a function)")
            if value is None and "None" in kinds:
                continue
            if isinstance(value, bool):  # a bool is an int to isinstance
                fits = "bool" in kinds
            else:
                fits = any(isinstance(value, OPTION_TYPES[kind]) for kind in kinds if kind in OPTION_TYPES)
            if not fits:
                raise self.fail((key, name), f"must be {' or '.join(kinds)}, got {value!r}")
            if _is_number(value) and (value < 0 or not math.isfinite(value)):
                raise self.fail((key, name), f"must not be negative, got {value!r}")

    def read_trials(self, grid_size: int | None) -> int:
        trials = self.data.get("trials", grid_size or 20)
        if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
            raise self.fail(("trials",), f"must be a positive integer, got {trials!r}")
        if grid_size is not None and trials > grid_size:
            raise self.fail(("trials",), f"the grid has {grid_size} points; a grid study runs at most that many")
        return trials
