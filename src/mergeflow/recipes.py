"""Recipes: complete, validated params files for a workload (`recipes/*.yaml`).

A recipe is a `params.yaml` for one workload (the toy zoo, the Llama-3 code+math RegMean merge,
the LLM-Merging competition). `mergeflow use RECIPE` validates it and writes it over `params.yaml`
(comments kept), so `dvc repro` then reruns exactly the stages whose parameters changed and
`dvc exp run -S alpha=...` keeps working on top of it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from .io import atomic_file
from .params import Params, load_params

log = logging.getLogger(__name__)


def use_recipe(recipe: str | Path, params_file: str | Path = "params.yaml") -> Params:
    """Validate `recipe` and make it the pipeline's params file; return the new params."""
    recipe, params_file = Path(recipe), Path(params_file)
    params = load_params(recipe)  # refuses unknown keys, wrong types and missing experts, naming the file
    if recipe.resolve() == params_file.resolve():
        return params
    with atomic_file(params_file) as tmp:
        shutil.copyfile(recipe, tmp)
    log.info("%s -> %s: experts %s from %s, method %s, alpha %s", recipe, params_file, params.experts, params.models.source, params.method, params.alpha)
    return params
