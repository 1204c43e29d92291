"""The merge engine: validate experts, base and grams, then stream tensor by tensor through a method.

Everything that can be checked is checked before the first byte is written (tensor names and
shapes across experts and base, grams present for the same modules in every gram directory and of
the right size); non-finite values are refused as they are read. Tensors stream from `safe_open`
into pre-planned output shards, huge ones in blocks of rows when the method allows it, so peak
memory is a few blocks plus one Linear's grams, whatever the model's size. The output is built in
a temporary sibling renamed into place at the end: a failed or killed merge leaves nothing
half-written, and an existing model stays as it was.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from .checkpoint import CheckpointReader, ShardedWriter, TensorSpec, copy_model_files
from .grams import GramDir
from .grams.format import check_grams_match
from .io import atomic_dir, write_json
from .methods import MergeMethod

log = logging.getLogger(__name__)
MERGE_CONFIG = "mergeflow_merge.json"
BLOCK_BYTES = 256 * 2**20
LM_HEAD = "lm_head"


def check_same_tensors(first: CheckpointReader, other: CheckpointReader, what: str) -> None:
    """Refuse `other` unless it has exactly `first`'s tensor names and shapes."""
    missing, extra = set(first.names()) - set(other.names()), set(other.names()) - set(first.names())
    if missing or extra:
        raise ValueError(
            f"{what} differ in tensor names: {other.path} lacks {sorted(missing)[:3]} and has extra {sorted(extra)[:3]} "
            f"compared with {first.path}; all experts must share one architecture"
        )
    for name in first.names():
        if first.shape(name) != other.shape(name):
            raise ValueError(f"{what} differ in the shape of {name}: {first.shape(name)} in {first.path}, {other.shape(name)} in {other.path}")


def is_tied(model_dir: Path) -> bool:
    config = json.loads((Path(model_dir) / "config.json").read_text()) if (Path(model_dir) / "config.json").is_file() else {}
    return bool(config.get("tie_word_embeddings", False))


def solved_modules(grams: Sequence[GramDir], reader: CheckpointReader, *, lm_head: bool) -> list[str]:
    """The Linears RegMean solves: every block Linear with grams, plus `lm_head` when asked for.

    `lm_head` needs grams of its own and is never solved when tied to the input embeddings (the
    merged model's embeddings would no longer equal its output layer).
    """
    modules = set(grams[0].modules)
    for g in grams[1:]:
        if set(g.modules) != modules:
            missing = sorted(modules - set(g.modules)) or sorted(set(g.modules) - modules)
            raise ValueError(f"gram directories disagree: {g.path} and {grams[0].path} differ in modules {missing[:3]}; recompute grams for the same model")
    names = set(reader.names())
    for module in sorted(modules):
        if f"{module}.weight" not in names and module != LM_HEAD:
            raise ValueError(f"{grams[0].path}: has a gram for {module!r}, which is not a Linear of {reader.path}; were the grams computed for another model?")
    solve = {m for m in modules if m != LM_HEAD}
    if lm_head:
        if is_tied(reader.path) or f"{LM_HEAD}.weight" not in names:
            log.warning("lm_head is tied to the input embeddings in %s: averaging it instead of solving it", reader.path)
        elif LM_HEAD not in modules:
            raise ValueError(f"{grams[0].path}: no gram for lm_head, but RegMean on lm_head was asked for; compute grams with lm_head (params.yaml: gram.include_lm_head: true)")
        else:
            solve.add(LM_HEAD)
    for module in sorted(solve):
        in_features = reader.shape(f"{module}.weight")[-1]
        for g in grams:
            shape = g.shape(module)
            if shape != (in_features, in_features):
                raise ValueError(f"{g.path / g.modules[module].file}: gram of {module} has shape {shape}, expected ({in_features}, {in_features})")
    return sorted(solve)


def row_blocks(spec: TensorSpec, row_separable: bool, block_bytes: int) -> list[Optional[slice]]:
    """`[None]` (the whole tensor) or consecutive row slices of about `block_bytes` in float32."""
    as_float32 = spec.numel * 4
    if not row_separable or len(spec.shape) < 2 or as_float32 <= block_bytes:
        return [None]
    rows = max(1, block_bytes * spec.shape[0] // as_float32)
    return [slice(start, min(start + rows, spec.shape[0])) for start in range(0, spec.shape[0], rows)]


def check_finite(tensor: torch.Tensor, where: str, chunk: int = 2**24) -> torch.Tensor:
    """Refuse NaN/inf, 16M entries at a time (no full-size temporary for a huge gram).

    A finite sum proves every entry finite (inf and NaN propagate through a sum), and summing is
    ~40x faster than `isfinite`; only a block whose sum overflows gets the exact element test.
    """
    if tensor.is_floating_point():
        flat = tensor.reshape(-1)
        for start in range(0, flat.numel(), chunk):
            block = flat[start : start + chunk]
            if not torch.isfinite(block.sum()) and not torch.isfinite(block).all():
                raise ValueError(f"{where}: holds NaN or infinite values; fix or recompute it before merging")
    return tensor


@dataclass(frozen=True)
class DiskGramLoader:
    """Loads one expert's per-token mean gram of one module, checked finite, in `dtype` on `device`.

    Summed grams are divided by their own token count and imported mean grams used as they are, so
    experts weigh the same whichever way their grams were stored.

    `key` names the stored tensor: modules that see the same input (q/k/v, gate/up) share it, so
    a method can reuse work done for one of them (RegMean factors each gram sum once).
    """

    grams: GramDir
    module: str
    dtype: torch.dtype
    device: str

    @property
    def key(self) -> tuple[str, str, str]:
        ref = self.grams.modules[self.module]
        return (str(self.grams.path), ref.file, ref.key)

    def __call__(self) -> torch.Tensor:
        gram = self.grams.load_mean(self.module, self.dtype, self.device)  # sums divided by their token count
        return check_finite(gram, f"{self.grams.path / self.grams.modules[self.module].file} (gram of {self.module})")


def merge_models(
    experts: Sequence[str | Path],
    method: MergeMethod,
    out: str | Path,
    *,
    grams: Sequence[str | Path] = (),
    base: Optional[str | Path] = None,
    lm_head: bool = False,
    max_shard_size: int = 5 * 2**30,
    block_bytes: int = BLOCK_BYTES,
    overwrite: bool = True,
    verify_grams: bool = True,
) -> dict:
    """Merge `experts` with `method` into the HF directory `out`; return the saved merge config."""
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    if len(experts) < 2:
        raise ValueError(f"need at least two experts to merge, got {len(experts)}")
    readers = [CheckpointReader(e) for e in experts]
    for other in readers[1:]:
        check_same_tensors(readers[0], other, "experts")
    base_reader = None
    if method.uses_base:
        if base is None:
            raise ValueError(f"method {method.name!r} needs the base model the experts were fine-tuned from (--base, or models/base in the pipeline)")
        base_reader = CheckpointReader(base)
        check_same_tensors(readers[0], base_reader, "experts and base")
    gram_dirs: list[GramDir] = []
    solved: set[str] = set()
    if method.uses_grams:
        if len(grams) != len(experts):
            raise ValueError(f"method {method.name!r} needs one gram directory per expert: {len(experts)} experts, {len(grams)} gram dirs (--gram)")
        gram_dirs = [GramDir.open(g) for g in grams]
        check_grams_match(gram_dirs, experts)
        if verify_grams:  # DVC does not rehash what it pulls or caches: a flipped bit would merge silently
            for g in tqdm(gram_dirs, desc="verify grams (SHA-256)", unit="dir"):
                g.verify()
        solved = set(solved_modules(gram_dirs, readers[0], lm_head=lm_head))
    specs = [readers[0].specs[name] for name in readers[0].names()]
    if solved:  # Linears sharing one gram (q/k/v, gate/up) next to each other: RegMean factors it once
        shared = {f"{m}.weight": gram_dirs[0].modules[m].key for m in solved}
        specs.sort(key=lambda spec: (shared.get(spec.name, spec.name), spec.name))
    dtype, device = method.options.solver_dtype, method.options.device

    with atomic_dir(out) as tmp:
        writer = ShardedWriter(tmp, specs, max_shard_size)
        for spec in tqdm(specs, desc=f"merge ({method.name})", unit="tensor"):
            module = spec.name.removesuffix(".weight")
            loaders = None
            if spec.name.endswith(".weight") and module in solved:
                loaders = [DiskGramLoader(g, module, dtype, device) for g in gram_dirs]
            for rows in row_blocks(spec, method.row_separable, block_bytes):
                tensors = [check_finite(r.get(spec.name, rows), f"{r.path}: {spec.name}") for r in readers]
                base_tensor = check_finite(base_reader.get(spec.name, rows), f"{base_reader.path}: {spec.name}") if base_reader else None
                merged = check_finite(method.merge(spec.name, tensors, grams=loaders, base=base_tensor), f"merged tensor {spec.name}")
                if merged.shape != tensors[0].shape:
                    raise ValueError(f"method {method.name!r} returned shape {tuple(merged.shape)} for {spec.name}, expected {tuple(tensors[0].shape)}")
                writer.write(spec.name, merged.to(spec.dtype))
                del tensors, base_tensor, merged
        writer.close()
        copy_model_files(experts[0], tmp)
        config = {
            **method.config(),
            "experts": [str(e) for e in experts],
            "base": str(base) if base_reader else None,
            "grams": [str(g.path) for g in gram_dirs],
            "num_tokens": [g.num_tokens for g in gram_dirs],
            "gram_reductions": [g.reduction for g in gram_dirs],
            "solved_modules": len(solved),
            "lm_head_solved": LM_HEAD in solved,
            "least_squares_fallback": list(getattr(method, "fell_back", [])),
        }
        write_json(tmp / MERGE_CONFIG, config)
        (tmp / "README.md").write_text(model_card(config))
    log.info("merged %d tensors of %d experts with %s -> %s", len(specs), len(experts), method.name, out)
    return config


def model_card(config: dict) -> str:
    return (
        "---\nlibrary_name: transformers\ntags: [merge, mergeflow]\n---\n"
        f"# Merged model ({config['method']})\n\n"
        "Merged with mergeflow from:\n\n"
        + "".join(f"- `{e}`\n" for e in config["experts"])
        + f"\nMerge configuration (also in `{MERGE_CONFIG}`):\n\n```json\n{json.dumps(config, indent=2)}\n```\n"
    )
