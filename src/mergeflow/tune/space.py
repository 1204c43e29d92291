"""The search space of `mergeflow tune`: the `tune.space` params, checked before any trial runs.

Each entry maps a params key that the merge stage reads (`alpha`, `method`, `merge.<name>` of a
param some merge method declares, or `merge.regmean_lm_head`) to

- a range `[low, high]` or `{low, high, log: true}` (numeric params);
- `{choices: [...]}`;
- `simplex`: per-expert weights, non-negative and summing to 1;
- `{..., gradient: k}` with a range or `simplex: true`: a per-layer value of k points, interpolated
  over the layers as mergekit's gradients are (params the method declares `per_layer`).

Every bound and choice is validated as the params file itself would be (so `alpha: [0, 2]` fails
on alpha's own bound), and a trial's values become `dvc exp run -S key=value` overrides.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from pydantic import ValidationError

from ..params import Params

ENGINE_KEYS = ("merge.regmean_lm_head",)  # the engine's keys a search may set (not where it runs)
DECIMALS = 4  # sampled numbers are rounded: readable `dvc exp show` columns, the same bytes in params.yaml


def declared(method: str) -> dict[str, Any]:
    """`alpha` and `merge.<name>` -> the Param declaring it (registered methods and the selected plugin)."""
    from ..methods import declared_params
    from ..params import _load_method

    cls = _load_method(method)
    params = declared_params([cls] if cls is not None else [])
    out = {}
    for name, pairs in params.items():
        param = next((p for c, p in pairs if c is cls), pairs[0][1])
        out[name if name == "alpha" else f"merge.{name}"] = param
    return out


def searchable_keys(method: str) -> list[str]:
    return ["alpha", "method", *sorted(k for k in declared(method) if k != "alpha"), *ENGINE_KEYS]


@dataclass(frozen=True)
class Dimension:
    """One entry of the space: how a trial samples the value of params key `key`."""

    key: str
    kind: str                      # float | int | choice | simplex
    low: float = 0.0
    high: float = 1.0
    log: bool = False
    choices: tuple = ()
    experts: int = 0               # simplex: one weight per expert
    points: int = 0                # gradient: this many values over the layers (0: one value)

    def suggest(self, trial) -> Any:
        """The value of this entry for an Optuna trial (ask-and-tell or a sampler's grid)."""
        if self.kind == "choice":
            return self.choices[trial.suggest_categorical(self.key, list(range(len(self.choices))))]
        if not self.points:
            return self._one(trial, self.key)
        values = [self._one(trial, f"{self.key}@{i}") for i in range(self.points)]
        if self.kind == "simplex":  # one gradient per expert, on the simplex at every point
            return [[w[e] for w in values] for e in range(self.experts)]
        return values

    def _one(self, trial, name: str) -> Any:
        if self.kind == "float":
            return round(trial.suggest_float(name, self.low, self.high, log=self.log), DECIMALS)
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        # simplex: w_i = -log(u_i) normalised is a uniform draw from the simplex (Dirichlet(1, ..., 1))
        raw = [-math.log(max(trial.suggest_float(f"{name}.{i}", 0.0, 1.0), 1e-6)) for i in range(self.experts)]
        return simplex_round([r / sum(raw) for r in raw])

    def grid(self, points: int) -> dict[str, list]:
        """The Optuna grid of this entry (`sampler: grid`): `points` evenly spaced values of a range."""
        if self.kind == "choice":
            return {self.key: list(range(len(self.choices)))}
        if self.kind == "simplex":
            raise ValueError(f"tune.space.{self.key}: `simplex` cannot be gridded; give {{choices: [[...], ...]}} of weights summing to 1, or sampler tpe/cmaes")
        if self.log:
            values = [self.low * (self.high / self.low) ** (i / (points - 1)) for i in range(points)]
        else:
            values = [self.low + (self.high - self.low) * i / (points - 1) for i in range(points)]
        values = sorted({round(v) for v in values}) if self.kind == "int" else [round(v, DECIMALS) for v in values]
        names = [f"{self.key}@{i}" for i in range(self.points)] if self.points else [self.key]
        return {name: values for name in names}


def simplex_round(weights: list[float]) -> list[float]:
    """Weights rounded to DECIMALS places that still sum to 1 (the last takes the remainder)."""
    head = [round(w, DECIMALS) for w in weights[:-1]]
    return [*head, round(1.0 - sum(head), DECIMALS)]


def _check_value(raw: Mapping[str, Any], key: str, value: Any, where: str) -> None:
    """Validate `key: value` as the params file would hold it, for a clear error before any trial."""
    data = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in raw.items()}
    group, _, name = key.rpartition(".")
    (data.setdefault(group, {}) if group else data)[name] = value
    try:
        Params.model_validate(data)
    except ValidationError as err:
        message = err.errors()[0]["msg"].removeprefix("Value error, ")
        raise ValueError(f"{where}: {value!r} is not a valid {key}: {message}") from None


def _range(spec: Any, where: str) -> Optional[tuple[float, float, bool]]:
    if isinstance(spec, list) and len(spec) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec):
        low, high, log = spec[0], spec[1], False
    elif isinstance(spec, Mapping) and "low" in spec and "high" in spec and set(spec) <= {"low", "high", "log", "gradient"}:
        low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
    else:
        return None
    if not low < high:
        raise ValueError(f"{where}: empty range [{low}, {high}]; give [low, high] with low < high")
    if log and low <= 0:
        raise ValueError(f"{where}: a log range needs low > 0, got {low}")
    return float(low), float(high), log


def _gradient(spec: Any, param: Any, where: str) -> int:
    points = spec.get("gradient", 0) if isinstance(spec, Mapping) else 0
    if not points:
        return 0
    if not (isinstance(points, int) and not isinstance(points, bool) and points >= 2):
        raise ValueError(f"{where}: gradient must be a number of points >= 2, got {points!r}")
    if param is None or not param.per_layer:
        raise ValueError(f"{where}: not a per-layer param (no method declares it so); remove `gradient`")
    return points


def _choices(key: str, spec: Mapping, raw: Mapping[str, Any], per_expert: bool, where: str) -> Dimension:
    choices = spec["choices"]
    if not isinstance(choices, list) or not choices:
        raise ValueError(f"{where}: choices must be a non-empty list, got {choices!r}")
    for choice in choices:
        if per_expert and isinstance(choice, list) and choice and all(isinstance(w, (int, float)) for w in choice) \
                and not math.isclose(sum(choice), 1.0, abs_tol=1e-6):
            raise ValueError(f"{where}: weights {choice} sum to {sum(choice):g}, not 1; every choice must lie on the simplex")
        _check_value(raw, key, choice, where)
    return Dimension(key, "choice", choices=tuple(choices))


def parse_dimension(key: str, spec: Any, raw: Mapping[str, Any], experts: int) -> Dimension:
    """One `tune.space` entry, validated against the params `raw` (the params file as read)."""
    where = f"tune.space.{key}"
    method = raw.get("method", "regmean") if isinstance(raw.get("method"), str) else "regmean"
    params = declared(method)
    if key not in searchable_keys(method):
        raise ValueError(f"{where}: unknown parameter {key!r}; a space may set {', '.join(searchable_keys(method))}")
    param = params.get(key)
    per_expert = bool(param is not None and param.per_expert)
    if isinstance(spec, Mapping) and set(spec) == {"choices"}:
        return _choices(key, spec, raw, per_expert, where)
    points = _gradient(spec, param, where)
    if per_expert:
        if spec == "simplex" or (isinstance(spec, Mapping) and spec.get("simplex") is True and set(spec) <= {"simplex", "gradient"}):
            dim = Dimension(key, "simplex", experts=experts, points=points)
            _check_value(raw, key, [[1.0 / experts] * points] * experts if points else [1.0 / experts] * experts, where)
            return dim
        raise ValueError(f"{where}: per-expert weights are `simplex` or {{choices: [[w1, ..., w{experts}], ...]}} summing to 1, got {spec!r}")
    if spec == "simplex" or (isinstance(spec, Mapping) and "simplex" in spec):
        raise ValueError(f"{where}: `simplex` is for per-expert weights; give [low, high] or {{choices: [...]}}")
    bounds = _range(spec, where)
    if bounds is None:
        raise ValueError(f"{where}: expected [low, high], {{low, high, log, gradient}}, {{choices: [...]}} or simplex, got {spec!r}")
    kind = {float: "float", int: "int"}.get(param.type if param is not None else None)
    if kind is None:
        raise ValueError(f"{where}: {key} is not numeric; give {{choices: [...]}}")
    low, high, log = bounds
    for value in (low, high):
        value = int(value) if kind == "int" else value
        _check_value(raw, key, [value] * points if points else value, where)
    return Dimension(key, kind, low=low, high=high, log=log, points=points)


def parse_space(space: Mapping[str, Any], raw: Mapping[str, Any], experts: int) -> list[Dimension]:
    """Every entry of `tune.space`; the first problem is one ValueError line naming the entry."""
    if not space:
        raise ValueError("tune.space is empty; give the params to search, e.g. {alpha: [0.0, 1.0], merge.weights: simplex}")
    return [parse_dimension(key, spec, raw, experts) for key, spec in space.items()]


def grid_space(dimensions: list[Dimension], points: int) -> dict[str, list]:
    grid: dict[str, list] = {}
    for d in dimensions:
        grid.update(d.grid(points))
    return grid


def grid_size(dimensions: list[Dimension], points: int) -> int:
    return math.prod(len(v) for v in grid_space(dimensions, points).values())
