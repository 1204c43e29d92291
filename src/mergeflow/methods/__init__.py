"""The one registry of merge methods: `@register` adds a class, `get_method` looks one up by name."""

from __future__ import annotations

import difflib

from .base import MergeMethod

_REGISTRY: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator adding a method under `cls.name`; a second class with that name is refused."""
    if cls.name in _REGISTRY:
        raise ValueError(f"merge method {cls.name!r} is already registered by {_REGISTRY[cls.name].__module__}")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> type[MergeMethod]:
    """The class registered as `name`; an unknown name is answered with the known ones."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown merge method {name!r}; available: {', '.join(available())}.{hint} (params.yaml: method, or --method)")
    return _REGISTRY[name]


from . import average, regmean  # noqa: E402,F401  (registers the built-in methods)

__all__ = ["MergeMethod", "available", "get_method", "register"]
