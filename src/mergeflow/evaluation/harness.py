"""Running lm-eval on one model: tasks resolved offline, metrics flattened, samples logged.

Writes `out` (a DVC metrics file, `{task: {metric: value}}`) and, with `log_dir`, one JSONL file
of lm-eval's per-sample records per task (`<log_dir>/<task>.jsonl`: the document, the request,
the model's responses and each metric), a DVC output kept out of git.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_dir, check_replaceable, write_json
from ..model_files import require_model_dir
from ..models import is_encoder_decoder
from ..params import EvalParams
from .backends import make_lm, resolve_backend
from .code_eval import code_execution, is_code_task
from .tasks import BUILTIN_DATA, DataFiles, LocalData, builtin_override, check_data, find_builtin, local_files, shipped_override, shipped_tasks

log = logging.getLogger(__name__)


def is_stderr(metric: str) -> bool:
    """A flattened metric that is a standard error: `exact_match_stderr`, or after a filter
    `exact_match_stderr_last_number` (see `flatten_results`)."""
    return metric.endswith("_stderr") or "_stderr_" in metric


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


SAMPLES_INDEX = "mergeflow_samples.json"  # written into every sample-log folder: what mergeflow put there


def sample_logs(log_dir: Path) -> set[str] | None:
    """What a sample-log folder mergeflow wrote holds: the files its index lists, and the index.
    None for a non-empty folder without one: `.jsonl` files alone may be anybody's data."""
    index = log_dir / SAMPLES_INDEX
    if not index.is_file():
        return None if any(log_dir.iterdir()) else set()
    try:
        return {*json.loads(index.read_text())["files"], SAMPLES_INDEX}
    except (ValueError, KeyError, TypeError):
        return None


def check_log_dir(log_dir: str | Path, inputs: Sequence[str | Path] = ()) -> None:
    """Refuse a `--logs` folder that holds anything but earlier sample logs, or is (or holds) an input."""
    check_replaceable(log_dir, force=True, inputs=inputs, owned_files=sample_logs, what="sample-log", option="--logs")


def write_samples(samples: Mapping[str, list[dict]], log_dir: str | Path) -> None:
    """lm-eval's per-sample records as `<log_dir>/<task>.jsonl` plus their index, replacing the folder atomically."""
    from lm_eval.utils import handle_non_serializable

    check_log_dir(log_dir)
    with atomic_dir(log_dir) as tmp:
        for task, records in samples.items():
            with open(tmp / f"{task}.jsonl", "w") as fh:
                fh.writelines(json.dumps(record, default=handle_non_serializable, ensure_ascii=False) + "\n" for record in records)
        write_json(tmp / SAMPLES_INDEX, {"files": sorted(f"{task}.jsonl" for task in samples)})


def refuse_unknown(unknown: Sequence[str]) -> None:
    if unknown:
        raise ValueError(f"unknown lm-eval tasks {list(unknown)} (eval.tasks); shipped: {shipped_tasks()}, or any lm-eval task name")


def task_manager(tasks: Sequence[str], shipped_dir: Path):
    """lm-eval's TaskManager over the overrides of the shipped tasks and only as much of lm-eval's
    tree as the other `tasks` need (indexing all of it takes ~25 s on 2 cores)."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind

    builtin = [t for t in dict.fromkeys(tasks) if t not in set(shipped_tasks())]
    dirs, unknown = find_builtin(builtin)
    refuse_unknown(unknown)
    manager = None
    if dirs is not None:
        manager = TaskManager(include_path=[*map(str, dirs), str(shipped_dir)], include_defaults=False)
        if not all(t in manager.task_index and manager.task_index[t].kind == Kind.TASK for t in builtin):
            manager = None
    manager = manager or TaskManager(include_path=str(shipped_dir), include_defaults=True)
    refuse_unknown([t for t in tasks if t not in manager.all_tasks])
    return manager


def prepare_tasks(tasks: Sequence[str], data_files: Mapping[str, DataFiles], data_root: Path, tmp: Path) -> tuple[Any, list[str], list[LocalData]]:
    """The TaskManager, what to hand lm-eval for each task (its name, or the override YAML of a
    built-in task on local data) and every task's local data files (for `check_data`)."""
    shipped_dir, builtin_dir = tmp / "shipped", tmp / "builtin"
    shipped_dir.mkdir(parents=True)
    shipped = set(shipped_tasks())
    data = [shipped_override(task, data_files, data_root, shipped_dir)[1] for task in dict.fromkeys(tasks) if task in shipped]
    manager = task_manager(tasks, shipped_dir)
    specs = []
    for task in tasks:
        files = data_files.get(task, BUILTIN_DATA.get(task))
        if task in shipped or files is None:
            specs.append(task)
            continue
        entry = manager.task_index[task]
        if entry.yaml_path is None:
            raise ValueError(f"eval.data_files.{task}: {task} is not a YAML task of lm-eval; its data cannot be replaced")
        where = f"eval.data_files.{task}" if task in data_files else f"the default data of {task}"
        data.append(local_files(task, files, entry.cfg or {}, data_root, where))
        specs.append(str(builtin_override(task, entry.yaml_path, entry.cfg or {}, data[-1], builtin_dir)))
    return manager, specs, [d for d in data if d is not None]


def evaluate_model(
    model_dir: str | Path,
    tasks: Sequence[str],
    out: str | Path,
    *,
    params: EvalParams | None = None,
    data_root: str | Path = ".",
    limit: int | None = None,
    log_dir: str | Path | None = None,
    lm=None,
) -> dict[str, dict[str, float]]:
    """Evaluate `model_dir` on `tasks` with lm-eval; write flattened metrics to `out`.

    `params` (the `eval` group) picks the backend and its arguments, local data files, and whether
    code-executing tasks may run; `limit` caps the documents per task (None: `params.limit`).
    `lm`: an lm-eval LM to use instead of loading `model_dir` (tests, several calls on one model).
    """
    from lm_eval import simple_evaluate

    params = params or EvalParams()
    limit = params.limit if limit is None else limit
    data_root = Path(data_root)
    model_dir = require_model_dir(model_dir)
    if lm is None:
        resolve_backend(params.backend, seq2seq=is_encoder_decoder(model_dir))  # a missing vllm is reported before any work
    if log_dir is not None:
        check_log_dir(log_dir, [model_dir])  # before minutes of evaluation, not after
    unknown_files = sorted(set(params.data_files) - set(tasks))
    if unknown_files:
        log.info("eval.data_files names tasks that are not run: %s", unknown_files)
    with tempfile.TemporaryDirectory(prefix="mergeflow-tasks-") as tmp:
        manager, specs, data = prepare_tasks(tasks, params.data_files, data_root, Path(tmp))
        code_tasks = [t for t in tasks if is_code_task(t, manager.task_index[t].cfg)]
        with code_execution(params.allow_code_execution, code_tasks) as confirm:
            check_data(data)
            lm = lm if lm is not None else make_lm(model_dir, params)
            gen_kwargs = {"max_gen_toks": params.max_gen_toks} if params.max_gen_toks else None
            output = simple_evaluate(
                model=lm, tasks=specs, task_manager=manager, limit=limit, gen_kwargs=gen_kwargs,
                log_samples=log_dir is not None, confirm_run_unsafe_code=confirm,
            )
    metrics = flatten_results(output["results"])
    write_json(out, metrics)
    if log_dir is not None:
        write_samples(output.get("samples", {}), log_dir)
    log.info("%s: %s", model_dir, metrics)
    return metrics


def expert_label(name: str) -> str:
    """How an expert is named in summaries, score tables and reports: `expert-math`."""
    return f"expert-{name}"


def evaluation_summary(files: Mapping[str, str | Path]) -> dict[str, Any]:
    """`{model: {task: {metric: value}}}` from per-model metrics files, standard errors left out."""
    table: dict[str, Any] = {}
    for model, path in files.items():
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: metrics of {model} not found (run its evaluate stage first)")
        metrics = json.loads(path.read_text())
        table[model] = {task: {m: v for m, v in values.items() if not is_stderr(m)} for task, values in metrics.items()}
    return table
