"""The small tables that `dvc plots` draws (dvc.yaml's top-level `plots:`), written by `summary`.

Both are long tables (one row per model or experiment and metric), so that the plots follow
whatever tasks `eval.tasks` lists without naming them in dvc.yaml; the vega-lite templates in
`.dvc/plots/` colour and facet them by metric:

- `metrics/scores.csv` (`model,metric,score`): base, each expert and the merged model, for a bar
  chart per metric (`dvc plots diff` puts one bar per revision beside the other).
- `metrics/sweep.csv` (`method,alpha,metric,score`): the merged model only, with the merge
  parameters it was made with; across experiments (`dvc plots diff $(dvc exp ls --name-only)`)
  the rows of every revision together are the alpha sweep, score against alpha.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .atomic import atomic_file

SCORES_HEADER = ("model", "metric", "score")
SWEEP_HEADER = ("method", "alpha", "metric", "score")


def metric_rows(table: Mapping[str, Mapping[str, float]]) -> list[tuple[str, float]]:
    """`{task: {metric: value}}` -> `[("task.metric", value), ...]`, numbers only, in file order."""
    return [(f"{task}.{name}", float(v)) for task, values in table.items() if isinstance(values, Mapping)
            for name, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]


def score_rows(summary: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str, float]]:
    """`evaluation_summary`'s `{model: {task: {metric: value}}}` -> `(model, metric, score)` rows."""
    return [(model, metric, score) for model, table in summary.items() for metric, score in metric_rows(table)]


def sweep_rows(merged: Mapping[str, Mapping[str, float]], method: str, alpha: float) -> list[tuple[str, float, str, float]]:
    """The merged model's `{task: {metric: value}}` -> `(method, alpha, metric, score)` rows."""
    return [(method, float(alpha), metric, score) for metric, score in metric_rows(merged)]


def write_csv(path: str | Path, header: tuple[str, ...], rows: list[tuple]) -> None:
    """A small CSV, written atomically (DVC reads it at any revision, so never half of it)."""
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
