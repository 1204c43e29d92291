"""The search space of `mergeflow tune`: the `tune.space` params, checked before any trial runs.

Each entry maps a params key that the merge stage reads (`alpha`, `method`, `merge.<name>`) to
a range `[low, high]` (or `{low, high, log: true}`), explicit `{choices: [...]}`, or `simplex`
for per-expert weights (non-negative, summing to 1). Every bound and choice is validated as the
params file itself would be (so `alpha: [0, 2]` fails on alpha's own bound), and a trial's values
become `dvc exp run -S key=value` overrides.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from pydantic import ValidationError

from ..params import MergeParams, Params

# Keys of the merge stage's params that a search may set (the others say where things run).
TOP_LEVEL = ("alpha", "method")
NOT_SEARCHABLE = ("device", "max_shard_size", "check_magnitude")
PER_EXPERT = ("merge.weights",)
DECIMALS = 4  # sampled numbers are rounded: readable `dvc exp show` columns, the same bytes in params.yaml


def searchable_keys() -> list[str]:
    return [*TOP_LEVEL, *(f"merge.{name}" for name in MergeParams.model_fields if name not in NOT_SEARCHABLE)]


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

    def suggest(self, trial) -> Any:
        """The value of this entry for an Optuna trial (ask-and-tell or a sampler's grid)."""
        if self.kind == "float":
            return round(trial.suggest_float(self.key, self.low, self.high, log=self.log), DECIMALS)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        if self.kind == "choice":
            index = trial.suggest_categorical(self.key, list(range(len(self.choices))))
            return self.choices[index]
        # simplex: w_i = -log(u_i) normalised is a uniform draw from the simplex (Dirichlet(1, ..., 1))
        raw = [-math.log(max(trial.suggest_float(f"{self.key}.{i}", 0.0, 1.0), 1e-6)) for i in range(self.experts)]
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
        if self.kind == "int":
            return {self.key: sorted({round(v) for v in values})}
        return {self.key: [round(v, DECIMALS) for v in values]}


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
        first = err.errors()[0]
        raise ValueError(f"{where}: {value!r} is not a valid {key}: {first['msg']}") from None
    except ValueError as err:
        raise ValueError(f"{where}: {value!r} is not a valid {key}: {err}") from None


def _range(key: str, spec: Any, where: str) -> Optional[tuple[float, float, bool]]:
    if isinstance(spec, list) and len(spec) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec):
        low, high, log = spec[0], spec[1], False
    elif isinstance(spec, Mapping) and "low" in spec and "high" in spec and set(spec) <= {"low", "high", "log"}:
        low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
    else:
        return None
    if not low < high:
        raise ValueError(f"{where}: empty range [{low}, {high}]; give [low, high] with low < high")
    if log and low <= 0:
        raise ValueError(f"{where}: a log range needs low > 0, got {low}")
    return float(low), float(high), log


def parse_dimension(key: str, spec: Any, raw: Mapping[str, Any], experts: int) -> Dimension:
    """One `tune.space` entry, validated against the params `raw` (the params file as read)."""
    where = f"tune.space.{key}"
    if key not in searchable_keys():
        raise ValueError(f"{where}: unknown parameter {key!r}; a space may set {', '.join(searchable_keys())}")
    if key in PER_EXPERT:
        if spec == "simplex":
            return Dimension(key, "simplex", experts=experts)
        if not (isinstance(spec, Mapping) and set(spec) == {"choices"}):
            raise ValueError(f"{where}: per-expert weights are `simplex` or {{choices: [[w1, ..., w{experts}], ...]}} summing to 1, got {spec!r}")
    elif spec == "simplex":
        raise ValueError(f"{where}: `simplex` is for per-expert weights ({', '.join(PER_EXPERT)}); give [low, high] or {{choices: [...]}}")
    if isinstance(spec, Mapping) and set(spec) == {"choices"}:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ValueError(f"{where}: choices must be a non-empty list, got {choices!r}")
        for choice in choices:
            if key in PER_EXPERT and isinstance(choice, list) and choice and not math.isclose(sum(choice), 1.0, abs_tol=1e-6):
                raise ValueError(f"{where}: weights {choice} sum to {sum(choice):g}, not 1; every choice must lie on the simplex")
            _check_value(raw, key, choice, where)
        return Dimension(key, "choice", choices=tuple(choices))
    bounds = _range(key, spec, where)
    if bounds is None:
        raise ValueError(f"{where}: expected [low, high], {{low, high, log}}, {{choices: [...]}} or simplex, got {spec!r}")
    low, high, log = bounds
    annotation = (MergeParams.model_fields[key.split(".", 1)[1]] if key.startswith("merge.") else Params.model_fields[key]).annotation
    kind = "int" if annotation is int else "float"
    if annotation not in (int, float):
        raise ValueError(f"{where}: {key} is not numeric; give {{choices: [...]}}")
    for value in (low, high):
        _check_value(raw, key, int(value) if kind == "int" else value, where)
    return Dimension(key, kind, low=low, high=high, log=log)


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


def lattice(experts: int, steps: int) -> list[list[float]]:
    """The points of the simplex with coordinates in multiples of 1/steps (for explicit grids)."""
    return [[c / steps for c in combo] for combo in itertools.product(range(steps + 1), repeat=experts) if sum(combo) == steps]
