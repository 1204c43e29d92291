"""Diagonal Fisher information of each expert, for Fisher merging (Matena & Raffel, 2022).

`compute.compute_fisher` writes a Fisher directory (`format`); the `fisher` merge method weights
every parameter by it. This package's top level stays free of torch: the `fisher@<expert>` stage
asks `needs_fisher` whether the pipeline's method reads a Fisher at all and, when it does not,
writes only a marker without loading the model.
"""

from __future__ import annotations

from importlib.metadata import entry_points

# Built-in methods that read a Fisher (registered methods with `uses_fisher`; a test keeps the two
# in step). Plugins and entry points are imported to ask them.
FISHER_METHODS = frozenset({"fisher"})


def needs_fisher(method: str) -> bool:
    """Whether merge method `method` (a registered name, `file.py:Class` or an entry point) reads a Fisher."""
    if method in FISHER_METHODS:
        return True
    plugin = method.rpartition(":")[0].endswith(".py")
    if not plugin and method not in {ep.name for ep in entry_points(group="mergeflow.methods")}:
        return False  # a built-in method (or an unknown name, which the merge stage refuses)
    from ..methods import get_method

    return bool(getattr(get_method(method), "uses_fisher", False))
