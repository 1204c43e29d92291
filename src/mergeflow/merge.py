"""The merge engine: validate experts and grams, then stream tensor by tensor through a method.

Everything that can be checked is checked before the first byte is written (tensor names and
shapes across experts, grams present for the same modules in every gram directory and of the right
size), and the output is built in a temporary directory renamed into place at the end, so a failed
or interrupted merge leaves nothing half-written.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .checkpoint import CheckpointReader, ShardedWriter, copy_model_files
from .grams import GramDir
from .io import atomic_dir, write_json
from .methods import MergeMethod

log = logging.getLogger(__name__)
MERGE_CONFIG = "mergeflow_merge.json"


def check_experts(readers: Sequence[CheckpointReader]) -> list[str]:
    """The tensor names every expert has, in the first expert's order; refuse any difference."""
    first = readers[0]
    for other in readers[1:]:
        missing, extra = set(first.names()) - set(other.names()), set(other.names()) - set(first.names())
        if missing or extra:
            raise ValueError(
                f"experts differ in tensor names: {other.path} lacks {sorted(missing)[:3]} and has extra {sorted(extra)[:3]} "
                f"compared with {first.path}; all experts must share one architecture"
            )
        for name in first.names():
            if first.shape(name) != other.shape(name):
                raise ValueError(f"experts differ in the shape of {name}: {first.shape(name)} in {first.path}, {other.shape(name)} in {other.path}")
    return first.names()


def gram_modules(grams: Sequence[GramDir], reader: CheckpointReader) -> list[str]:
    """Modules whose weights are solved with grams: those in the gram dirs, the same in all of them."""
    modules = set(grams[0].modules)
    for g in grams[1:]:
        if set(g.modules) != modules:
            missing = sorted(modules - set(g.modules)) or sorted(set(g.modules) - modules)
            raise ValueError(f"gram directories disagree: {g.path} and {grams[0].path} differ in modules {missing[:3]}; recompute grams for the same model")
    names = set(reader.names())
    for module in sorted(modules):
        if f"{module}.weight" not in names:
            raise ValueError(f"{grams[0].path}: has a gram for {module!r}, which is not a Linear of {reader.path}; were the grams computed for another model?")
        in_features = reader.shape(f"{module}.weight")[-1]
        for g in grams:
            ref = g.modules[module]
            with safe_open(g.path / ref.file, framework="pt") as f:
                shape = tuple(f.get_slice(ref.key).get_shape())
            if shape != (in_features, in_features):
                raise ValueError(f"{g.path / ref.file}: gram of {module} has shape {shape}, expected ({in_features}, {in_features})")
    return sorted(modules)


def merge_models(
    experts: Sequence[str | Path],
    method: MergeMethod,
    out: str | Path,
    *,
    grams: Sequence[str | Path] = (),
    max_shard_size: int = 5 * 2**30,
    overwrite: bool = True,
) -> dict:
    """Merge `experts` with `method` into the HF directory `out`; return the saved merge config."""
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    if len(experts) < 2:
        raise ValueError(f"need at least two experts to merge, got {len(experts)}")
    readers = [CheckpointReader(e) for e in experts]
    names = check_experts(readers)
    gram_dirs: list[GramDir] = []
    solved: set[str] = set()
    if method.uses_grams:
        if len(grams) != len(experts):
            raise ValueError(f"method {method.name!r} needs one gram directory per expert: {len(experts)} experts, {len(grams)} gram dirs (--gram)")
        gram_dirs = [GramDir.open(g) for g in grams]
        solved = set(gram_modules(gram_dirs, readers[0]))
    elif grams:
        log.info("method %s does not use grams; ignoring %d gram directories", method.name, len(grams))

    with atomic_dir(out) as tmp:
        writer = ShardedWriter(tmp, max_shard_size)
        for name in tqdm(names, desc=f"merge ({method.name})", unit="tensor"):
            tensors = [r.get(name) for r in readers]
            module = name.removesuffix(".weight")
            module_grams = None
            if name.endswith(".weight") and module in solved:
                module_grams = [g.load(module).to(method.solver_dtype) / g.num_tokens for g in gram_dirs]
            merged = method.merge(name, tensors, module_grams)
            if not torch.isfinite(merged).all():
                raise ValueError(f"merged tensor {name} has non-finite values; check the experts and grams for NaN/inf")
            writer.add(name, merged.to(tensors[0].dtype))
        writer.close()
        copy_model_files(experts[0], tmp)
        config = {
            **method.config(),
            "experts": [str(e) for e in experts],
            "grams": [str(g.path) for g in gram_dirs],
            "num_tokens": [g.num_tokens for g in gram_dirs],
            "solved_modules": len(solved),
            "least_squares_fallback": list(getattr(method, "fell_back", [])),
        }
        write_json(tmp / MERGE_CONFIG, config)
        (tmp / "README.md").write_text(model_card(config))
    log.info("merged %d tensors of %d experts with %s -> %s", len(names), len(experts), method.name, out)
    return config


def model_card(config: dict) -> str:
    return (
        "---\nlibrary_name: transformers\ntags: [merge, mergeflow]\n---\n"
        f"# Merged model ({config['method']})\n\n"
        "Merged with mergeflow from:\n\n"
        + "".join(f"- `{e}`\n" for e in config["experts"])
        + f"\nMerge configuration (also in `{MERGE_CONFIG}`):\n\n```json\n{json.dumps(config, indent=2)}\n```\n"
    )
