"""What a tune run needs from the params file, checked as a whole before any trial runs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..params import Params, TuneParams, load_params
from .experiments import override
from .space import Dimension, grid_size, parse_space


@dataclass(frozen=True)
class TuneConfig:
    """The validated `tune:` group, the space it declares, and the tasks each trial evaluates."""

    params: Params
    dimensions: list[Dimension]

    @property
    def tune(self) -> TuneParams:
        return self.params.tune

    @property
    def validation_tasks(self) -> list[str]:
        """The tasks a trial evaluates: the objective's, in `eval.tasks` order."""
        return [t for t in self.params.eval.tasks if t in self.tune.objective]

    @property
    def trial_overrides(self) -> list[str]:
        """Overrides every trial adds: evaluate the validation tasks only (held-out ones never)."""
        tasks = self.validation_tasks
        return [] if tasks == self.params.eval.tasks else [override("eval.tasks", tasks)]

    @property
    def target(self) -> int:
        """Trials the study runs: `tune.trials`, or the grid's size when that is smaller."""
        if self.tune.sampler == "grid":
            return min(self.tune.trials, grid_size(self.dimensions, self.tune.grid_points))
        return self.tune.trials

    def fingerprint(self) -> str:
        """What the recorded trials depend on: another value makes them another study's."""
        t = self.tune
        return json.dumps({"space": t.space, "objective": t.objective, "held_out": t.held_out, "direction": t.direction,
                           "sampler": t.sampler, "grid_points": t.grid_points, "seed": t.seed, "eval.tasks": self.params.eval.tasks},
                          sort_keys=True)


def check_tasks(params: Params) -> None:
    t = params.tune
    if not t.objective:
        raise ValueError("tune.objective is empty; give the validation tasks and their metric, e.g. {toy_math: exact_match}")
    for group, tasks in (("objective", t.objective), ("held_out", t.held_out)):
        for task in tasks:
            if task not in params.eval.tasks:
                raise ValueError(f"tune.{group}.{task}: not one of eval.tasks ({', '.join(params.eval.tasks)}); add it there or remove it here")
    both = sorted(set(t.objective) & set(t.held_out))
    if both:
        raise ValueError(f"tune.held_out.{both[0]}: also a validation task in tune.objective; a held-out task must never select the trial")


def load_config(params_file: Path) -> TuneConfig:
    """Read the params file and check the `tune:` group (space, tasks, grid); ValueError lines."""
    params = load_params(params_file)  # its errors name the file
    raw: dict[str, Any] = yaml.safe_load(Path(params_file).read_text()) or {}
    try:
        check_tasks(params)
        dimensions = parse_space(params.tune.space, raw, len(params.experts))
        if params.tune.sampler == "grid":
            grid_size(dimensions, params.tune.grid_points)  # refuses what cannot be gridded
    except ValueError as err:
        raise ValueError(f"{params_file}: {err}") from None
    return TuneConfig(params=params, dimensions=dimensions)
