"""The composed run config against one schema, before any work: Python annotations.

``trainer.*`` is checked against TrainerConfig's fields, ``task.*`` against the parameters of the
task class's constructor (its ``_target_``, and the constructors of its bases for what it passes on
through ``**kwargs``), and the plain top-level keys against ``RunKeys``. A value of the wrong type
(``trainer.steps=1.5``, ``seed=abc``, ``task.horizon=1.5``) is an error naming the key, the type the
annotation asks for and where that annotation is, instead of a raw TypeError from deep inside a run
(or none at all). Parameters without an annotation, or annotated with a type a config value cannot
be (a module, an array), are left to the code that uses them.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import types
import typing
from pathlib import PurePath
from typing import Any


@dataclasses.dataclass
class RunKeys:
    """The plain-valued top-level keys of configs/config.yaml (``resume`` takes words or a path: launch
    reads it)."""
    seed: int = 0
    device: str = "cpu"
    overwrite: bool = False


def expected_type(value: Any, annotation: Any) -> str | None:
    """None when ``value`` (a plain config value: YAML scalars, lists, dicts) fits ``annotation``, else
    the type it should have, in words. ints are not bools and 1.5 is not an int; a float takes an int;
    a Path takes a str; a list or tuple annotation takes a list (never a str)."""
    if annotation is Any or annotation is inspect.Parameter.empty or isinstance(annotation, (str, typing.TypeVar)):
        return None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        misses = [expected_type(value, member) for member in args]
        return None if None in misses else " or ".join(misses)
    if origin is typing.Literal:
        return None if value in args else "one of " + ", ".join(map(repr, args))
    if annotation in (None, type(None)):
        return None if value is None else "None"
    if annotation is bool:
        return None if isinstance(value, bool) else "bool"
    if annotation is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "int"
    if annotation is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "float"
    if annotation is str:
        return None if isinstance(value, str) else "str"
    if isinstance(annotation, type) and issubclass(annotation, PurePath):
        return None if isinstance(value, (str, PurePath)) else "str or Path"
    sequence = origin or annotation
    if sequence is tuple and args and args[-1] is not Ellipsis:
        wanted = "a list [" + ", ".join(_words(a) for a in args) + "]"
        fits = isinstance(value, (list, tuple)) and len(value) == len(args)
        return None if fits and all(expected_type(v, a) is None for v, a in zip(value, args)) else wanted
    if isinstance(sequence, type) and sequence is not str and issubclass(sequence, collections.abc.Sequence):
        item = args[0] if args else Any
        wanted = f"a list of {_words(item)}" if args else "a list"
        fits = isinstance(value, (list, tuple)) and all(expected_type(v, item) is None for v in value)
        return None if fits else wanted
    if isinstance(sequence, type) and issubclass(sequence, collections.abc.Mapping):
        item = args[1] if len(args) == 2 else Any
        wanted = f"a dict of {_words(item)}" if len(args) == 2 else "dict"
        fits = isinstance(value, dict) and all(expected_type(v, item) is None for v in value.values())
        return None if fits else wanted
    return None  # a type no config value is (a module, an array): the code that uses it checks it


def _words(annotation: Any) -> str:
    """``annotation`` as ``expected_type`` words it (what no value fits)."""
    return expected_type(_NOTHING, annotation) or "anything"


_NOTHING = object()  # fits no annotation but Any


def _fix(key: str, wanted: str) -> str:
    if wanted.startswith(("a ", "one of")):
        return f"set {key} to {wanted}"
    return f"set {key} to {'an' if wanted[0] in 'aeiou' else 'a'} {wanted}"


def _check(prefix: str, values: dict, annotations: dict[str, tuple[Any, str]],
           owner: tuple[str, str] | None) -> list[str]:
    """Problems of ``values`` against ``{name: (annotation, where it is)}``. ``owner``: (what, "field" or
    "parameter") when the annotated names are all it takes; None when ``**kwargs`` may take others."""
    problems = []
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name.startswith("_") or (isinstance(value, dict) and "_target_" in value):
            continue  # Hydra's own keys (_target_, ...) and objects instantiate builds
        if name not in annotations:
            if owner is not None:
                what, kind = owner
                problems.append(f"{key}: {what} has no such {kind} (its {kind}s: {', '.join(annotations)})")
            continue
        annotation, where = annotations[name]
        wanted = expected_type(value, annotation)
        if wanted is not None:
            problems.append(f"{key}={value!r}: expected {wanted} (the annotation of {where}); {_fix(key, wanted)}")
    return problems


def _field_annotations(cls: type) -> dict[str, tuple[Any, str]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f"{cls.__name__}.{f.name}") for f in dataclasses.fields(cls)}


def _constructor_annotations(cls: type) -> tuple[dict[str, tuple[Any, str]], bool]:
    """``{parameter: (annotation, where)}`` over ``cls.__init__`` and, while a constructor passes
    ``**kwargs`` on, its bases'; and whether unknown names are still taken (a ``**kwargs`` at the end)."""
    found: dict[str, tuple[Any, str]] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass is object:  # reached through **kwargs: whatever the last constructor does with them
            return found, True
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # an annotation that does not resolve here: those parameters go unchecked
            hints = {}
        takes_more = False
        for name, parameter in inspect.signature(init).parameters.items():
            if parameter.kind is parameter.VAR_KEYWORD:
                takes_more = True
            elif name != "self" and name not in found:
                found[name] = (hints.get(name, Any), f"{klass.__name__}.__init__'s {name}")
        if not takes_more:
            return found, False
    return found, True


def check_config(config: dict) -> None:
    """Raise ValueError listing every value of ``config`` (a resolved run config) that does not fit the schema."""
    from hydra.utils import get_class

    from dopr.train import TrainerConfig

    top = {k: v for k, v in config.items() if k in {f.name for f in dataclasses.fields(RunKeys)}}
    problems = _check("", top, _field_annotations(RunKeys), None)
    problems += _check("trainer.", config.get("trainer") or {}, _field_annotations(TrainerConfig),
                       ("TrainerConfig", "field"))
    task = config.get("task") or {}
    problems += [f"task.{key}: give the run's {key} at the top level ({key}={example}); it goes down to the "
                 f"task from there, once" for key, example in (("seed", 1), ("device", "cuda")) if key in task]
    if "_target_" in task:
        cls = get_class(task["_target_"])
        annotations, takes_more = _constructor_annotations(cls)
        owner = None if takes_more else (f"{cls.__name__}.__init__", "parameter")
        problems += _check("task.", task, annotations, owner)
    if problems:
        raise ValueError("the config does not fit its schema:\n  " + "\n  ".join(problems))
