"""Run configurations: every hyper-parameter the suite knows, its type and range, and validation.

A configuration is a flat dict: the model's registry defaults, overridden by the user's `--set key=value`
(or a sweep's parameters), checked here before anything runs or is written. A plugin model's own
hyper-parameters (bench.models.plugins) are checked by the types of its constructor's parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bench.corpora import CORPORA, TAGGING_CORPORA
from bench.errors import BenchError
from bench.inputs import load_yaml
from bench.models.plugins import model_spec

TASK_CORPORA = {"lm": CORPORA, "tagging": TAGGING_CORPORA}


@dataclass(frozen=True)
class Param:
    kind: type | str  # int, float, bool, str, "ints" (a list of ints) or "floats" (a number or a list of them)
    low: float = -math.inf
    high: float = math.inf
    choices: tuple = ()
    help: str = ""

    def check(self, key: str, value):
        if self.kind == "ints":
            if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise BenchError(f"{key} must be a list of integers such as [2000, 6000], got {value!r}", key)
            return value
        if self.kind == "floats":
            values = value if isinstance(value, list) else [value]
            if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise BenchError(f"{key} must be a number or a list of numbers such as [150, 141.3], got {value!r}",
                                 key)
            return [Param(float, self.low, self.high).check(key, v) for v in values]
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if self.kind is str and isinstance(value, int) and str(value) in self.choices:
            value = str(value)  # YAML reads `precision=32` as a number
        if self.choices and value not in self.choices:
            raise BenchError(f"{key} must be one of {', '.join(map(str, self.choices))}, got {value!r}", key)
        if not isinstance(value, self.kind) or (self.kind is not bool and isinstance(value, bool)):
            raise BenchError(f"{key} must be {self.kind.__name__}, got {value!r}", key)
        if self.kind in (int, float) and not self.low <= value <= self.high:
            raise BenchError(f"{key} must be between {self.low:g} and {self.high:g}, got {value!r}", key)
        return value


# Settings of the harness, valid for every model.
HARNESS = {
    "corpus": Param(str, choices=tuple(dict.fromkeys(CORPORA + TAGGING_CORPORA)), help="corpus name"),
    "seed": Param(int, 0, 2**31 - 1, help="seed of every random choice (data order, initialisation)"),
    "batch_size": Param(int, 1, 1_000_000, help="parallel streams per batch"),
    "bptt": Param(int, 1, 100_000, help="steps per chunk (truncated BPTT length)"),
    "eval_batch_size": Param(int, 1, 1_000_000, help="parallel streams when scoring (the scores equal one stream's)"),
    "max_epochs": Param(int, 1, 10_000, help="epoch budget"),
    "max_minutes": Param(float, 0.01, 1e6, help="wall-clock training budget in minutes"),
    "clip": Param(float, 0.0, 1e9, help="gradient-norm clipping (0: off)"),
    "patience": Param(int, 0, 1000, help="schedule plateau: epochs without improvement, after the LR-halving one, "
                                         "before stopping"),
    "min_improvement": Param(float, 1.0, 2.0, help="schedule rnnlm: halve the rate (the second time: stop) when "
                                                   "the validation cross-entropy improves by less than this factor"),
    "init_range": Param(float, 0.0, 10.0, help="initialise every parameter from U(-r, r) (0: the layers' own "
                                               "initialisation)"),
    "target_ppl": Param("floats", 1.0, 1e9, help="validation perplexities whose wall-clock time to reach is "
                                                 "recorded (minutes_to_target)"),
    "kn_order": Param(int, 0, 9, help="interpolate with a Kneser-Ney model of this order (0: off)"),
    "limit_train_batches": Param(int, 0, 10**9, help="training batches per epoch (0: all)"),
}
# Settings of Lightning's Trainer: where a run trains, and in what precision. At their defaults they stay out
# of the configuration (TRAINER_DEFAULTS fills them in), so a run on one device keeps the configuration, and
# the run folder, it had before these settings existed. ddp_spawn is not offered: its workers hand back only
# the weights and the logged metrics, not the harness's clock, curve and exact perplexities.
TRAINER = {
    "accelerator": Param(str, choices=("auto", "cpu", "gpu", "cuda", "mps"), help="device kind (auto: a visible "
                                                                                  "GPU, else the CPU)"),
    "devices": Param(int, 1, 4096, help="devices per node; several: one run in data parallel (DDP), the training "
                                        "streams split among them"),
    "num_nodes": Param(int, 1, 4096, help="machines of a DDP run"),
    "strategy": Param(str, choices=("auto", "ddp"), help="auto, or ddp (one process per device)"),
    "precision": Param(str, choices=("32", "bf16-mixed", "16-mixed"), help="32-bit, or mixed precision under "
                                                                           "autocast (on CPU 16-mixed runs as bf16)"),
}
TRAINER_DEFAULTS = dict(accelerator="auto", devices=1, num_nodes=1, strategy="auto", precision="32")
# The options of each schedule, with their defaults; an option of another schedule than the run's is an error.
SCHEDULE_OPTIONS = {"plateau": {"patience": 1}, "rnnlm": {"min_improvement": 1.003},
                    "zaremba": {"decay": 0.5, "decay_after": 4}}
SCHEDULES = tuple(SCHEDULE_OPTIONS)  # bench.schedules
# Settings of the models; each model accepts those its registry entry sets, plus the shared ones.
MODEL = {
    "optimizer": Param(str, choices=("sgd", "adam"), help="SGD (sparse embedding gradients) or Adam"),
    "lr": Param(float, 1e-8, 1e4, help="learning rate"),
    "l2": Param(float, 0.0, 1.0, help="L2 weight decay of the dense parameters (rnnlm's -beta)"),
    "schedule": Param(str, choices=SCHEDULES, help="learning-rate schedule (bench.schedules)"),
    "decay": Param(float, 0.0, 1.0, help="schedule zaremba: the rate's factor every epoch after decay_after"),
    "decay_after": Param(int, 0, 10_000, help="schedule zaremba: epochs at the initial rate"),
    "output": Param(str, choices=("full", "class", "adaptive"), help="output layer"),
    "classes": Param(int, 1, 10_000_000, help="classes of the class-based output layer"),
    "class_binning": Param(str, choices=("frequency", "sqrt"), help="words to classes by unigram frequency or by "
                                                                   "its square root (rnnlm's default)"),
    "cutoffs": Param("ints", help="adaptive softmax cluster boundaries (word ids)"),
    "div_value": Param(float, 1.0, 1e3, help="adaptive softmax: each cluster's projection this many times smaller"),
    "order": Param(int, 1, 9, help="n of the n-gram (Kneser-Ney) or of the feed-forward model's context"),
    "embedding_size": Param(int, 1, 1_000_000, help="size of the input word vectors"),
    "hidden_size": Param(int, 1, 1_000_000, help="units per hidden layer"),
    "layers": Param(int, 1, 64, help="stacked recurrent layers"),
    "dropout": Param(float, 0.0, 0.99, help="dropout probability (non-recurrent connections)"),
    "bptt_context": Param(int, 0, 10_000, help="steps before each chunk the gradient flows through too (rnn-bptt)"),
    "activation": Param(str, choices=("sigmoid", "tanh", "relu"), help="hidden units' non-linearity"),
    "tie_weights": Param(bool, help="share the input embedding with the output layer (Press & Wolf 2017)"),
    "cell": Param(str, choices=("elman", "gru", "lstm"), help="recurrent cell of the tagger"),
    "bidirectional": Param(bool, help="tagger reads both directions (false: left to right only)"),
}
# Keys of every model trained by gradient; of language models only (token streams, output layers, NN+KN).
TRAINING_KEYS = ("optimizer", "lr", "clip", "l2", "init_range", "schedule", *{k for o in SCHEDULE_OPTIONS.values()
                                                                              for k in o})
LM_KEYS = ("bptt", "eval_batch_size", "target_ppl")
NEURAL_LM_KEYS = ("output", "classes", "class_binning", "cutoffs", "div_value", "kn_order")
OUTPUT_OPTIONS = {"classes": "class", "class_binning": "class", "cutoffs": "adaptive", "div_value": "adaptive"}
QUICK_DEFAULTS = dict(kn_order=5)  # the quick suite shows every neural model's NN+KN column
HARNESS_DEFAULTS = dict(corpus="synthetic", seed=0, eval_batch_size=16, max_epochs=20, max_minutes=1440.0,
                        clip=0.0, kn_order=0, output="full", l2=0.0, init_range=0.0, schedule="plateau")


def parse_assignments(assignments: list[str]) -> dict:
    """`key=value` strings as a dict; values are read as YAML scalars/lists (1e-3, true, [2000, 6000])."""
    overrides = {}
    for item in assignments:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise BenchError(f"--set {item!r}: expected key=value")
        overrides[key.strip()] = load_yaml(text, f"--set {item!r}")
    return overrides


def allowed_keys(model: str) -> list[str]:
    spec = model_spec(model)
    optional = set(TRAINING_KEYS + LM_KEYS + NEURAL_LM_KEYS)
    # a built-in model takes the settings its registry entry sets; a plugin its constructor's parameters
    keys = set(HARNESS) - optional | (set(spec.params) if spec.plugin else set(spec.defaults))
    keys |= set(TRAINING_KEYS) | set(TRAINER) if spec.neural else set()
    keys |= set(LM_KEYS) if spec.task == "lm" else set()
    keys |= set(NEURAL_LM_KEYS) if spec.neural and spec.task == "lm" else set()
    return sorted(keys)


def number(value: float) -> str:
    """A bound as people write it: 1,000,000 and 0.25, not 1e+06."""
    return f"{int(value):,}" if math.isfinite(value) and value == int(value) and abs(value) < 1e12 else f"{value:g}"


def parameter_table(model: str) -> list[dict]:
    """What `bench train MODEL --help` lists: every key `--set` accepts for `model`, as validation checks it
    (type, range or choices) and with the default `bench train` uses; then the model's fixed settings."""
    spec = model_spec(model)
    defaults = {**HARNESS_DEFAULTS, **TRAINER_DEFAULTS, **spec.defaults}
    defaults |= SCHEDULE_OPTIONS.get(defaults.get("schedule"), {})
    params = parameters(spec)
    rows = []
    for key in allowed_keys(model):
        param = params[key]
        kind = param.kind if isinstance(param.kind, str) else param.kind.__name__
        choices = TASK_CORPORA[spec.task] if key == "corpus" else param.choices
        if choices:
            allowed = ", ".join(map(str, choices))
        elif param.kind in (int, float, "floats") and (math.isfinite(param.low) or math.isfinite(param.high)):
            allowed = f"{number(param.low)} .. {number(param.high)}"
        else:
            allowed = ""
        rows.append({"key": key, "type": kind, "allowed": allowed, "default": defaults.get(key, ""),
                     "meaning": param.help})
    return rows + [{"key": key, "type": "fixed", "allowed": "", "default": value, "meaning": f"what makes it {model}"}
                   for key, value in spec.fixed.items()]


def parameters(spec) -> dict[str, Param]:
    """How each key is checked for a model: the suite's own keys, and a plugin's constructor parameters by
    their types (a harness key keeps the suite's range even where a plugin takes it too)."""
    own = {key: Param(kind, choices=choices, help="the plugin's own (its constructor's parameter)")
           for key, (kind, choices) in spec.params.items()}
    return {**MODEL, **own, **HARNESS, **TRAINER}


def make_config(model: str, overrides: dict | None = None, quick: bool = False) -> dict:
    """The validated configuration of one run of `model`."""
    spec = model_spec(model)
    overrides = dict(overrides or {})
    keys = allowed_keys(model)
    if spec.plugin:
        for attribute, settings in (("DEFAULTS", spec.defaults), ("QUICK", spec.quick)):
            unknown = [key for key in settings if key not in keys]
            if unknown:
                raise BenchError(f"model plugin {model!r}: {attribute} sets unknown hyper-parameter {unknown[0]!r}; "
                                 f"known: {', '.join(keys)}", "model")
    for key in overrides:
        if key in spec.fixed:
            raise BenchError(f"{key} is fixed for {model} (it is what makes it {model})", key)
        if key not in keys:
            raise BenchError(f"unknown hyper-parameter {key!r} for {model}; known: {', '.join(keys)}", key)
    quick_settings = {**QUICK_DEFAULTS, **spec.quick} if quick else {}
    config = {**HARNESS_DEFAULTS, **spec.defaults, **quick_settings, **overrides}
    config = {key: value for key, value in config.items() if key in keys}
    if "schedule" in config:
        config = with_schedule_options(model, config, overrides)
    params = parameters(spec)
    for key, value in config.items():
        config[key] = params[key].check(key, value)
    config = {key: value for key, value in config.items() if TRAINER_DEFAULTS.get(key, ...) != value}
    if config["corpus"] not in TASK_CORPORA[spec.task]:
        raise BenchError(f"{model} needs a {'tagging' if spec.task == 'tagging' else 'language-model'} corpus: "
                         f"choose one of {', '.join(TASK_CORPORA[spec.task])}, got {config['corpus']!r}")
    for key, layer in OUTPUT_OPTIONS.items():
        if key in config and config.get("output") != layer:
            raise BenchError(f"{key} applies to output={layer}, not output={config.get('output')}", key)
    check_device_split(spec, config)
    return {"model": model, **config}


def check_device_split(spec, config: dict) -> None:
    """A run on several devices splits the training streams among its processes (bench.data): a language
    model's, in equal shares."""
    processes = config.get("devices", 1) * config.get("num_nodes", 1)
    if processes == 1:
        return
    if spec.task != "lm":
        raise BenchError(f"devices={config.get('devices', 1)}, num_nodes={config.get('num_nodes', 1)}: a run on "
                         "several devices splits token streams, so it is for language models only", "devices")
    if config["batch_size"] % processes:
        raise BenchError(f"batch_size {config['batch_size']} does not split into {processes} equal shares of "
                         f"streams (devices x num_nodes)", "batch_size")


def with_schedule_options(model: str, config: dict, overrides: dict) -> dict:
    """`config` with its schedule's options (defaults filled in) and no other schedule's."""
    schedule = config["schedule"]
    if schedule not in SCHEDULE_OPTIONS:
        MODEL["schedule"].check("schedule", schedule)
    if schedule == "rnnlm" and model_spec(model).task != "lm":
        raise BenchError(f"schedule rnnlm watches validation perplexity: it is for language models, not {model}",
                         "schedule")
    for other, options in SCHEDULE_OPTIONS.items():
        for key in options:
            if other != schedule and key in overrides:
                raise BenchError(f"{key} applies to schedule={other}, not schedule={schedule}", key)
    own = SCHEDULE_OPTIONS[schedule]
    others = {key for options in SCHEDULE_OPTIONS.values() for key in options} - set(own)
    return {**{k: v for k, v in config.items() if k not in others}, **{k: config.get(k, v) for k, v in own.items()}}


def model_arguments(config: dict) -> dict:
    """The keyword arguments of the model's module: its settings and fixed settings, no harness keys."""
    spec = model_spec(config["model"])
    return {**{k: v for k, v in config.items() if k in MODEL or k in spec.params}, **spec.fixed}
