"""Recipes: complete, validated params files for a workload (`recipes/*.yaml`).

A recipe is a `params.yaml` for one workload (the toy zoo, the Llama-3 code+math RegMean merge,
the LLM-Merging competition). `mergeflow use RECIPE` validates it and writes it over `params.yaml`
(comments kept), so `dvc repro` then reruns exactly the stages whose parameters changed and
`dvc exp run -S alpha=...` keeps working on top of it.

DVC cannot expand a params list into a stage's deps, so the merge stage lists one gram directory
per expert (which `dvc repro --pull` needs to fetch them); `use` rewrites those lines of
`dvc.yaml` for the recipe's experts, keeping everything else, comments included.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from .io import atomic_file
from .params import PIPELINE_PARAMS, Params, load_params

log = logging.getLogger(__name__)


GRAM_DEP = re.compile(r"^(\s+)- models/grams/[^\s#]+\s*$")


def sync_merge_deps(dvc_yaml: Path, experts: list[str]) -> bool:
    """Make the merge stage depend on `models/grams/<expert>` for exactly `experts`; True if changed."""
    lines = dvc_yaml.read_text().splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == "  merge:"), None)
    if start is None:
        raise ValueError(f"{dvc_yaml}: has no `merge` stage to point at the experts' grams")
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"^  \S", lines[i])), len(lines))
    block = [i for i in range(start, end) if GRAM_DEP.match(lines[i])]
    if not block:
        raise ValueError(f"{dvc_yaml}: the merge stage lists no `models/grams/<expert>` dependency to rewrite")
    indent = GRAM_DEP.match(lines[block[0]]).group(1)
    new = [f"{indent}- models/grams/{e}\n" for e in experts]
    if [lines[i] for i in block] == new:
        return False
    lines[block[0] : block[-1] + 1] = new
    with atomic_file(dvc_yaml) as tmp:
        tmp.write_text("".join(lines))
    return True


def use_recipe(recipe: str | Path, params_file: str | Path = "params.yaml", dvc_yaml: str | Path | None = "dvc.yaml") -> Params:
    """Validate `recipe` and make it the pipeline's params file; return the new params."""
    recipe, params_file = Path(recipe), Path(params_file)
    params = load_params(recipe, require=PIPELINE_PARAMS)  # refuses unknown or missing keys, wrong types and missing experts, naming the file
    if dvc_yaml is not None and Path(dvc_yaml).is_file():
        sync_merge_deps(Path(dvc_yaml), params.experts)
    if recipe.resolve() == params_file.resolve():
        return params
    with atomic_file(params_file) as tmp:
        shutil.copyfile(recipe, tmp)
    log.info("%s -> %s: experts %s from %s, method %s, alpha %s", recipe, params_file, params.experts, params.models.source, params.method, params.alpha)
    return params
