"""Models from outside the suite, and the lookup of every model name: model_spec(name), model_names().

A plugin is a class named either by a Python entry point of group `bench.models` in any installed package
(`mymodel = "mypackage.model:MyLM"` under [project.entry-points."bench.models"]), or directly as
`module.path:ClassName` wherever a model name is accepted. It implements the interface of
bench.models.base: a LanguageModel subclass with its own __init__ (taking **options), init_state and
forward; or a Tagger subclass with its own __init__ and forward. From the class the suite builds the
registry entry a built-in model has (bench.models.ModelSpec):

- hyper-parameters: the keyword parameters of its __init__ with defaults, typed int, float, str, bool or a
  Literal of one of them (an unannotated one takes its default's type), validated like the built-ins';
- `defaults`: PLUGIN_DEFAULTS of its task, its parameters' defaults, then its class attribute DEFAULTS
  (training settings such as lr, batch_size, bptt, optimizer, max_epochs); `quick`: its attribute QUICK,
  the overrides of `bench run`'s quick suite;
- `plugin`: its name, source (entry point or path), target, package and version, kept in every record.

Anything wrong with a plugin is a BenchError: one line naming it and what is missing. Listing the names
imports nothing; a plugin's class (and torch) is imported when its name is looked up.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import typing

from bench.errors import BenchError
from bench.models import REGISTRY, ModelSpec

ENTRY_POINT_GROUP = "bench.models"
HYPER_PARAMETER_TYPES = (int, float, str, bool)
# What a plugin trains with when it declares nothing: Adam at torch's suggested rate suits most architectures
# without tuning (plain SGD needs a rate per model); the streams and chunk length of the suite's RNNs.
PLUGIN_DEFAULTS = {"lm": dict(optimizer="adam", lr=1e-3, batch_size=32, bptt=35),
                   "tagging": dict(optimizer="adam", lr=1e-3, batch_size=32)}
# Per task: the base class in bench.models.base, the methods a plugin must define itself, and its
# constructor's leading positional parameters, which the suite fills (the vocabulary; the tagger's vocabulary
# size and tag names).
INTERFACES = {"lm": ("LanguageModel", ("__init__", "init_state", "forward"), 1),
              "tagging": ("Tagger", ("__init__", "forward"), 2)}


def entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """The installed entry points of group `bench.models`, by name."""
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if point.name in REGISTRY:
            raise BenchError(f"model plugin {point.name!r} of package {package_of(point)} has the name of a "
                             f"built-in model; rename its entry point")
        if point.name in found and found[point.name].value != point.value:
            raise BenchError(f"model plugin {point.name!r} is defined twice: by {package_of(found[point.name])} "
                             f"and by {package_of(point)}")
        found[point.name] = point
    return found


def package_of(point: importlib.metadata.EntryPoint) -> str:
    return f"{point.dist.name} {point.dist.version}" if point.dist else "(unknown package)"


def model_names() -> list[str]:
    """The built-in models, then the installed plugins' entry points."""
    return [*REGISTRY, *sorted(entry_points())]


def model_spec(name: str) -> ModelSpec:
    """The registry entry of a built-in model, an entry point's plugin, or a `module.path:ClassName`."""
    if name in REGISTRY:
        return REGISTRY[name]
    return plugin_spec(name)


@functools.cache
def plugin_spec(name: str) -> ModelSpec:
    points = entry_points()
    if name in points:
        point = points[name]
        source = {"source": "entry point", "target": point.value, "package": point.dist and point.dist.name,
                  "version": point.dist and point.dist.version}
        load = point.load
    elif ":" in name:
        module_name = name.partition(":")[0]
        package = importlib.metadata.packages_distributions().get(module_name.partition(".")[0], [None])[0]
        source = {"source": "path", "target": name, "package": package,
                  "version": package and importlib.metadata.version(package)}
        load = functools.partial(load_path, name)
    else:
        raise BenchError(f"unknown model {name!r}: choose one of {', '.join(model_names())}, "
                         f"or name a class as module.path:ClassName")
    try:
        module = load()
    except BenchError:
        raise
    except Exception as error:  # noqa: BLE001 -- whatever the plugin's import raises is the user's to fix
        reason = str(error).splitlines()[0] if str(error) else ""
        raise BenchError(f"model plugin {name!r}: cannot import {source['target']}: "
                         f"{type(error).__name__}{': ' + reason if reason else ''}") from None
    return spec_of(name, module, {"name": name, **source})


def load_path(name: str):
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute:
        raise BenchError(f"model {name!r}: give a class as module.path:ClassName")
    module = importlib.import_module(module_name)
    if not hasattr(module, attribute):
        raise BenchError(f"model plugin {name!r}: module {module_name} has no {attribute!r}")
    return getattr(module, attribute)


def spec_of(name: str, module, plugin: dict) -> ModelSpec:
    """The registry entry of plugin class `module`, checked against the interface of its task."""
    from bench.models import base as interface

    where = f"model plugin {name!r} ({plugin['target']})"
    if not isinstance(module, type):
        raise BenchError(f"{where} is not a class but {type(module).__name__}")
    task = next((task for task, (base, _, _) in INTERFACES.items() if issubclass(module, getattr(interface, base))),
                None)
    if task is None:
        raise BenchError(f"{where} is not a subclass of bench.models.base.LanguageModel or "
                         f"bench.models.base.Tagger")
    base_name, methods, positional = INTERFACES[task]
    base = getattr(interface, base_name)
    missing = [method for method in methods if getattr(module, method) is getattr(base, method)]
    if missing:
        raise BenchError(f"{where} does not implement {', '.join(missing)} (see bench.models.base.{base_name})")
    parameters = list(signature(module, where).parameters.values())[1 + positional:]
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        raise BenchError(f"{where}: __init__ must take **options and pass them on to {base_name}.__init__")
    shared = set(inspect.signature(base.__init__).parameters)  # the base's own settings (optimizer, lr, ...)
    params, defaults = {}, {}
    for parameter in parameters:
        if parameter.kind is inspect.Parameter.VAR_KEYWORD or parameter.name in shared:
            continue
        if parameter.default is inspect.Parameter.empty or parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            raise BenchError(f"{where}: __init__ parameter {parameter.name!r} needs a default (hyper-parameters "
                             f"are keyword parameters with defaults)")
        params[parameter.name] = hyper_parameter_type(parameter, where)
        defaults[parameter.name] = parameter.default
    own = {}
    for attribute in ("DEFAULTS", "QUICK"):
        own[attribute] = getattr(module, attribute, {})
        if not isinstance(own[attribute], dict):
            raise BenchError(f"{where}: {attribute} must be a dict of setting: value")
    return ModelSpec(f"{module.__module__}:{module.__qualname__}",
                     defaults={**PLUGIN_DEFAULTS[task], **defaults, **own["DEFAULTS"]}, quick=own["QUICK"], task=task,
                     params=params, plugin=plugin)


def signature(module: type, where: str) -> inspect.Signature:
    """The constructor's signature, its string annotations (`from __future__ import annotations`) resolved
    where they can be: a name only the type checker sees stays a string."""
    try:
        return inspect.signature(module.__init__, eval_str=True)
    except Exception:  # noqa: BLE001 -- an unresolvable annotation elsewhere in the signature
        return inspect.signature(module.__init__)


def hyper_parameter_type(parameter: inspect.Parameter, where: str) -> tuple[type, tuple]:
    """(type, allowed values or ()) of one constructor parameter."""
    annotation = parameter.annotation
    if annotation is inspect.Parameter.empty:
        annotation = type(parameter.default)
    annotation = {t.__name__: t for t in HYPER_PARAMETER_TYPES}.get(annotation, annotation)
    if annotation in HYPER_PARAMETER_TYPES:
        return annotation, ()
    choices = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else ()
    kinds = {type(choice) for choice in choices}
    if len(kinds) == 1 and kinds <= set(HYPER_PARAMETER_TYPES):
        return kinds.pop(), choices
    name = getattr(annotation, "__name__", str(annotation))
    raise BenchError(f"{where}: __init__ parameter {parameter.name!r} is typed {name}; a hyper-parameter is "
                     f"int, float, str, bool or a Literal of one of them")
