"""The one registry of merge methods.

Built-in methods register with `@register`; `get_method` looks one up by name and also accepts a
plugin of the user's own, without editing mergeflow:

- `path/to/file.py:ClassName`: a file defining a `MergeMethod` subclass (the LLM-Merging
  competition's style: a class with `__init__` and `merge`);
- the name of a Python entry point in the group `mergeflow.methods` of an installed package.
"""

from __future__ import annotations

import difflib
import importlib.util
from importlib.metadata import entry_points
from pathlib import Path
from typing import Iterable

from .base import WEIGHTS, GramHandle, MergeMethod, Param, ParamError

_REGISTRY: dict[str, type[MergeMethod]] = {}
ENTRY_POINT_GROUP = "mergeflow.methods"


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator adding a method under `cls.name`; a second class with that name is refused,
    and so is a param whose name another method declares with another type or form (one name, one
    CLI option, one params.yaml key: it must mean one kind of value)."""
    if cls.name in _REGISTRY:
        raise ValueError(f"merge method {cls.name!r} is already registered by {_REGISTRY[cls.name].__module__}")
    check_consistent(cls, _REGISTRY.values())
    _REGISTRY[cls.name] = cls
    return cls


def check_consistent(cls: type[MergeMethod], others) -> None:
    """Refuse a param of `cls` that a method of `others` declares with another type or form."""
    for p in cls.params:
        for other in others:
            q = next((q for q in other.params if q.name == p.name), None)
            if q is not None and (q.type, q.per_expert, q.per_layer, q.choices) != (p.type, p.per_expert, p.per_layer, p.choices):
                raise ValueError(f"merge method {cls.name!r}: param {p.name!r} differs in type or form from {other.name!r}'s; rename it or declare it alike")


def declared_params(extra: Iterable[type[MergeMethod]] = ()) -> dict[str, list[tuple[type[MergeMethod], Param]]]:
    """Every param name any registered method (and each of `extra`, e.g. a plugin) declares ->
    the (method, Param) pairs declaring it, in registry order."""
    out: dict[str, list[tuple[type[MergeMethod], Param]]] = {}
    for cls in [*(_REGISTRY[n] for n in available()), *extra]:
        for p in cls.params:
            out.setdefault(p.name, []).append((cls, p))
    return out


def available() -> list[str]:
    return sorted(_REGISTRY)


def _from_file(spec: str) -> type[MergeMethod]:
    path_text, _, class_name = spec.rpartition(":")
    path = Path(path_text)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: merge method plugin file not found (method: {spec})")
    module_spec = importlib.util.spec_from_file_location(f"mergeflow_plugin_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, MergeMethod)):
        raise ValueError(f"{path}: {class_name!r} is not a subclass of mergeflow.methods.base.MergeMethod (method: {spec})")
    return cls


def get_method(name: str) -> type[MergeMethod]:
    """The method class for `name`: a registered name, `file.py:Class`, or an entry point."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.rpartition(":")[0].endswith(".py"):
        return _from_file(name)
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if found:
        return found[0].load()
    close = difflib.get_close_matches(name, _REGISTRY, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"unknown merge method {name!r}; available: {', '.join(available())}, or path/to/file.py:ClassName.{hint} (params.yaml: method, or --method)"
    )


from . import average, regmean, task_arithmetic, ties  # noqa: E402,F401  (registers the built-in methods)

__all__ = ["WEIGHTS", "GramHandle", "MergeMethod", "Param", "ParamError", "available", "declared_params", "get_method", "register"]
