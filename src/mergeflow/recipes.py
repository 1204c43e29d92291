"""Recipes: complete, validated params files for a workload (`recipes/*.yaml`).

A recipe is a `params.yaml` for one workload (the toy zoo, the SmolLM2 laptop run, the Llama-3
code+math RegMean merge, the LLM-Merging competition). `mergeflow use RECIPE` validates it,
writes it over `params.yaml` (comments kept), pins its moving hub revisions to commits and
regenerates the parts of `dvc.yaml` that follow the params (see `pipeline.py`), printing each
change; `dvc repro` then reruns exactly the stages whose inputs changed. Switching back is the
same command with the other recipe (`mergeflow use recipes/toy.yaml`), and `mergeflow use
params.yaml` regenerates `dvc.yaml` after params.yaml was edited by hand.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import yaml

from .atomic import atomic_file
from .params import PIPELINE_PARAMS, Params, load_params
from .pipeline import pin_hub_revisions, sync_dvc_yaml

log = logging.getLogger(__name__)


def _leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def params_changes(old_text: str, new_text: str, params_file: Path) -> list[str]:
    """One line per top-level group of `params_file` whose values changed: the keys that did."""
    old, new = _leaves(yaml.safe_load(old_text) or {}), _leaves(yaml.safe_load(new_text) or {})
    changed = [k for k in old.keys() | new.keys() if old.get(k, KeyError) != new.get(k, KeyError)]
    changed = sorted((k for k in changed if not any(o.startswith(f"{k}.") for o in changed)),  # `calib: {}` -> `calib: {a: ...}`: calib.a
                     key=lambda k: (list(new).index(k) if k in new else len(new), k))
    groups: dict[str, list[str]] = {}
    for key in changed:
        groups.setdefault(key.split(".")[0], []).append(key)
    lines = []
    for group, keys in groups.items():
        if keys == [group]:
            lines.append(f"{params_file}: {group}: {old.get(group)!r} -> {new.get(group)!r}")
        else:
            shown = ", ".join(k[len(group) + 1:] for k in keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
            lines.append(f"{params_file}: {group}: {shown}")
    return lines


def use_recipe(recipe: str | Path, params_file: str | Path = "params.yaml", dvc_yaml: str | Path | None = "dvc.yaml") -> tuple[Params, list[str]]:
    """Validate `recipe`, make it the pipeline's params file and bring `dvc_yaml` in line with it;
    return the new params and one line per change made (file: what)."""
    recipe, params_file = Path(recipe), Path(params_file)
    params = load_params(recipe, require=PIPELINE_PARAMS)  # refuses unknown or missing keys, wrong types and missing experts, naming the file
    before = params_file.read_text() if params_file.is_file() else ""
    if recipe.resolve() != params_file.resolve():
        with atomic_file(params_file) as tmp:
            shutil.copyfile(recipe, tmp)
    changes = params_changes(before, params_file.read_text(), params_file)
    changes += pin_hub_revisions(params_file, params)
    params = load_params(params_file)
    if dvc_yaml is not None and Path(dvc_yaml).is_file():
        changes += sync_dvc_yaml(Path(dvc_yaml), params)
    log.info("%s -> %s: experts %s from %s, method %s, alpha %s", recipe, params_file, params.experts, params.models.source, params.method, params.alpha)
    return params, changes
