"""Sweep specs (sweeps/*.yaml): read, check whole, and turn into the samplers, pruners and configs of a study.

A grid is a mapping of lists (their product, Optuna's GridSampler over those parameters) or a list of such
mappings (the union of their products; the GridSampler then runs over one parameter, "configuration", whose
values name the points). Everything is checked on load, before a study is opened: each key's value
(bench.spec_schema), then every configuration the spec can produce -- each grid point, each combination of the
search space's bounds and choices -- through bench.config.make_config. A mistake is a BenchError carrying the
spec key it is about, which load_spec turns into the file, the line and the key (the YAML nodes' marks).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution

from bench.config import make_config
from bench.errors import BenchError
from bench.inputs import read_yaml_lines
from bench.models.output_layers import check_fits_vocabulary
from bench.models.plugins import model_names, model_spec
from bench.spec_schema import BUDGET, CONFIGURATION, check, check_fields, read_choice, read_grid, read_search
from bench.store import MAX_RETRY
from bench.tasks import LANGUAGE_MODEL, TASKS

SAMPLERS = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
            "grid": optuna.samplers.GridSampler}
PRUNERS = {"median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner,
           "none": optuna.pruners.NopPruner}


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
    definition: str = ""  # the spec less `trials`, `project` and `max_retry`, canonical JSON (bench.sweeps.same_study)

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
    if not path.is_file():
        raise BenchError(f"no sweep spec at {path}")
    data, locate = read_yaml_lines(path)
    try:
        return read_spec(data, path, vocab_size)
    except BenchError as error:
        raise error if error.key is None else locate(error) from None


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
    configs, metric, grid = check_configs(spec, data, vocab_size), spec.metric, bool(spec.grid_space)
    check(metric in task.sweep_metrics, f"choose one of {', '.join(task.sweep_metrics)} (validation figures of "
          f"{task.name} records), got {metric!r}", ("metric",))
    check(metric not in task.kn_metrics or all(c.get("kn_order") for c in configs),
          f"{metric} needs kn_order > 0 in every trial (fixed: kn_order: 5)", ("metric",))
    sampler, sampler_options = read_choice(data, "sampler", SAMPLERS, "grid" if grid else "tpe")
    pruner, pruner_options = read_choice(data, "pruner", PRUNERS, "none" if grid else "median")
    check((sampler == "grid") == grid, "the grid sampler runs a grid (grid:); a search space needs tpe or random",
          ("sampler",))
    check(pruner == "none" or metric == task.metric, f"the pruner watches {task.monitor} every epoch, so it needs "
          f"metric {task.metric}; set pruner: none", ("pruner",))
    trials = data.get("trials", spec.grid_size or 20)
    check(trials <= (spec.grid_size or trials), f"the grid has {spec.grid_size} points; a grid study runs at most "
          "that many", ("trials",))
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
    search, (grid_space, grid_points) = read_search(data), read_grid(data)
    check(not (search and grid_space), "give a search space or a grid, not both", ("grid",))
    check(search or grid_space, "give a search space (search:) or a grid (grid:)", ())
    tasks = {model_spec(m).task for m in models(data.get("model"), search, grid_space, grid_points)}
    check(len(tasks) == 1, f"models of different tasks ({', '.join(sorted(tasks))}) in one study", ("model",))
    return dict(search=search, grid_space=grid_space, grid_points=grid_points, task=tasks.pop())


def models(model, search: dict, grid_space: dict, grid_points: dict) -> list[str]:
    """The models the study runs, each checked at the key that names it."""
    chooser = "search" if "model" in search else "grid" if "model" in grid_space else None
    check(not chooser or model is None, f"the model is chosen by {chooser}; drop model:", ("model",))
    key = (chooser, "model") if chooser else ("grid",) if grid_points else ("model",)
    candidates = ([*search["model"].choices] if chooser == "search" else grid_space["model"] if chooser else
                  [point.get("model", model) for point in grid_points.values()] or [model])
    for candidate in candidates:
        check(candidate is not None, "no model: give model: (or a model in the grid)", key)
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
    the spec key that set the hyper-parameter it names (else the grid's, or the model's)."""
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
            given = {**{name: ("grid", name) for name in point if isinstance(data.get("grid"), dict)},
                     **{name: (part, name) for part in ("search", "fixed") for name in data.get(part) or {}},
                     **{BUDGET[name]: ("budget", name) for name in data.get("budget") or {}}, "corpus": ("corpus",)}
            key = given.get(error.key, ("grid",) if "grid" in data else ("model",))
            raise BenchError(f"{error} (in the configuration {point})", key) from None
    return configs
