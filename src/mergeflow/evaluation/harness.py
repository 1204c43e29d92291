"""Running lm-eval on one model and flattening its results into a DVC metrics file."""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from ..io import write_json
from .tasks import render_tasks, shipped_tasks

log = logging.getLogger(__name__)


def flatten_results(results: dict) -> dict[str, dict[str, float]]:
    """`{task: {"exact_match,none": v, ...}}` -> `{task: {"exact_match": v}}` (numbers only).

    A metric computed after a filter other than `none` keeps it as a suffix: `exact_match_strip`.
    """
    flat: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filter_name = key.split(",", 1)
            name = metric if filter_name == "none" else f"{metric}_{filter_name}"
            if not math.isfinite(float(value)):
                continue
            flat.setdefault(task, {})[name] = round(float(value), 6)
    return flat


def evaluate_model(
    model_dir: str | Path,
    tasks: Sequence[str],
    out: str | Path,
    *,
    data_root: str | Path = ".",
    limit: Optional[int] = None,
    batch_size: int = 32,
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> dict[str, dict[str, float]]:
    """Evaluate `model_dir` on `tasks` with lm-eval's HF backend; write flattened metrics to `out`."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; expected a Hugging Face model directory")
    # Indexing lm-eval's ~13k built-in task YAMLs takes ~25 s on 2 cores: only do it when asked for one.
    builtin_needed = not set(tasks) <= set(shipped_tasks())
    with tempfile.TemporaryDirectory(prefix="mergeflow-tasks-") as tmp:
        manager = TaskManager(include_path=str(render_tasks(Path(tmp), Path(data_root))), include_defaults=builtin_needed)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise ValueError(f"unknown lm-eval tasks {unknown} (params.yaml: eval.tasks); shipped: {shipped_tasks()}, or any lm-eval task name")
        lm = HFLM(pretrained=str(model_dir), device=device, batch_size=batch_size, trust_remote_code=trust_remote_code)
        output = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False)
    metrics = flatten_results(output["results"])
    write_json(out, metrics)
    log.info("%s: %s", model_dir, metrics)
    return metrics
