"""The merge engine: validate experts, base and grams, then stream tensor by tensor through a method.

Everything that can be checked is checked before the first byte is written (tensor names and
shapes across experts and base, grams present for the same modules in every gram directory and of
the right size); non-finite values are refused as they are read. Tensors stream from `safe_open`
into pre-planned output shards, huge ones in blocks of rows when the method allows it, so peak
memory is a few blocks plus one Linear's grams, whatever the model's size. The output is built in
a temporary sibling renamed into place at the end: a failed or killed merge leaves nothing
half-written, and an existing model stays as it was.

An existing `out` is replaced only when mergeflow wrote it: `mergeflow_merge.json` lists every
file of the merged model, and a directory holding anything else, a plain file, or an input of the
merge (an expert, a gram directory, the base, or a folder containing one) is refused. Disk space
is checked before the first byte and a full disk is reported with the output path; experts that
differ in architecture keys of config.json are refused even when their shapes agree, experts of
mixed dtypes get one warning saying the output's dtype, and merged values past MAX_ABS_WEIGHT
(a flipped exponent bit in an expert: finite but absurd) are refused naming the tensor and expert.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .atomic import atomic_dir, check_replaceable, full_disk_reported, write_json
from .heap import fix_mmap_threshold
from .model_files import BLOCK_BYTES, STREAM_BYTES, CheckpointReader, ShardedWriter, TensorSpec, copy_model_files, model_config
from .fisher.format import FisherDir, check_fisher_match
from .grams import GramDir
from .faults import fault_point
from .finite import check_finite  # noqa: F401  (also this module's name for it)
from .grams.format import check_grams_match
from .grams.solve import JointSolve
from .methods import MergeMethod

log = logging.getLogger(__name__)
MERGE_CONFIG = "mergeflow_merge.json"
# |weight| no trained LLM comes near (their weights are O(1), norms O(10)); an exponent bit flip
# gives 1e19 or more. `check_magnitude=False` (--no-magnitude-check) turns the check off.
MAX_ABS_WEIGHT = 1e4
# config.json keys that change what the tensors mean although their shapes may agree: refused.
ARCHITECTURE_KEYS = (
    "model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "hidden_act", "tie_word_embeddings", "attention_bias", "mlp_bias",
)
# keys that change behaviour but not the weights' meaning: the output keeps the first expert's; warned.
BEHAVIOUR_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings", "rms_norm_eps", "sliding_window")
# files a merged model directory of an older mergeflow (before `files` in mergeflow_merge.json) may hold
LEGACY_MODEL_FILES = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json", "*.json", "tokenizer*", "*.jinja", "*.model",
                      "merges.txt", "vocab.txt", "README.md")


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


def merged_files(out: Path) -> Optional[set[str]]:
    """The files mergeflow wrote in the merged model `out` (from its mergeflow_merge.json), or None
    when `out` is not a merged model."""
    try:
        config = json.loads((out / MERGE_CONFIG).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or "method" not in config:
        return None
    if "files" in config:
        return set(config["files"]) | {MERGE_CONFIG}
    return {p.name for p in out.iterdir() if any(fnmatch.fnmatch(p.name, pat) for pat in LEGACY_MODEL_FILES)}


def check_same_config(first: Path, other: Path, what: str) -> None:
    """Refuse experts whose config.json disagree on architecture keys; warn on behaviour keys."""
    a, b = model_config(first), model_config(other)
    for key in ARCHITECTURE_KEYS:
        if key in a and key in b and a[key] != b[key]:
            raise ValueError(
                f"{what} differ in config.json {key!r}: {a[key]!r} in {first}, {b[key]!r} in {other}; their tensors mean different "
                "things even where the shapes agree: merge experts fine-tuned from one base model"
            )
    differ = [key for key in BEHAVIOUR_KEYS if a.get(key) != b.get(key)]
    if differ:
        log.warning("%s differ in config.json %s (%s in %s, %s in %s): the merged model keeps %s's", what, ", ".join(map(repr, differ)),
                    a.get(differ[0]), first, b.get(differ[0]), other, first)


def warn_mixed_dtypes(readers: Sequence[CheckpointReader]) -> None:
    """One line when the experts store tensors in different dtypes, saying what the output takes."""
    first = readers[0]
    for other in readers[1:]:
        differ = [n for n in first.names() if first.specs[n].dtype != other.specs[n].dtype]
        if differ:
            n = differ[0]
            log.warning(
                "experts store different dtypes (%s in %s, %s in %s, %d tensors): the merge computes in float32 and writes %s, the dtype of "
                "the first expert (--model order), whose config.json the merged model copies; list an expert of the dtype you want first",
                str(first.specs[n].dtype).removeprefix("torch."), first.path, str(other.specs[n].dtype).removeprefix("torch."), other.path,
                len(differ), str(first.specs[n].dtype).removeprefix("torch."),
            )
            return


def max_abs(tensor: torch.Tensor) -> float:
    """The largest |value| of a float tensor, without an `abs()` copy of it (0 for others)."""
    if not tensor.is_floating_point() or not tensor.numel():
        return 0.0
    low, high = torch.aminmax(tensor)
    return max(-float(low), float(high))


def check_magnitude(merged: torch.Tensor, name: str, inputs: Sequence[tuple[Path, torch.Tensor]], method: str) -> None:
    """Refuse a merged tensor with |value| > MAX_ABS_WEIGHT, naming the input model(s) that hold one."""
    peak = max_abs(merged)
    if peak <= MAX_ABS_WEIGHT:
        return
    culprits = [f"{path} (|value| {max_abs(t):.3g})" for path, t in inputs if max_abs(t) > MAX_ABS_WEIGHT]
    source = f"from {', '.join(culprits)}, probably a corrupted weight (a flipped exponent bit): re-download or restore that expert" if culprits else (
        f"made by {method!r} from inputs that are all within {MAX_ABS_WEIGHT:.0e}: try other method parameters")
    raise ValueError(
        f"merged tensor {name}: |value| {peak:.3g} > {MAX_ABS_WEIGHT:.0e}, {source}; or pass --no-magnitude-check (params.yaml: merge.check_magnitude: false)"
    )


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def disk_full_message(out: Path, needed: int) -> str:
    return f"{out}: no space left on the device while writing the merged model ({human_size(needed)} of weights); nothing was kept: free space or choose --out on a larger disk"


def check_disk_space(out: Path, needed: int) -> None:
    """Refuse before writing when the output's filesystem has less free space than the model needs."""
    where = out.parent
    while not where.exists():
        where = where.parent
    usage = shutil.disk_usage(where)
    free = usage.free
    if usage.total and free < needed:  # total 0: a filesystem that reports nothing (some FUSE mounts)
        raise OSError(f"{out}: the merged model needs {human_size(needed)} but only {human_size(free)} is free there; free space or choose --out on a larger disk")


def row_blocks(spec: TensorSpec, row_separable: bool, block_bytes: int) -> list[Optional[slice]]:
    """`[None]` (the whole tensor) or consecutive row slices of about `block_bytes` in float32."""
    as_float32 = spec.numel * 4
    if not row_separable or len(spec.shape) < 2 or as_float32 <= block_bytes:
        return [None]
    rows = max(1, block_bytes * spec.shape[0] // as_float32)
    return [slice(start, min(start + rows, spec.shape[0])) for start in range(0, spec.shape[0], rows)]


def open_experts(experts: Sequence[str | Path], method: MergeMethod, base: Optional[str | Path]) -> tuple[list[CheckpointReader], Optional[CheckpointReader]]:
    """Readers of the experts and (for `uses_base` methods) the base, checked to share one architecture."""
    if len(experts) < 2:
        raise ValueError(f"need at least two experts to merge, got {len(experts)}")
    readers = [CheckpointReader(e) for e in experts]
    for other in readers[1:]:
        check_same_tensors(readers[0], other, "experts")
        check_same_config(readers[0].path, other.path, "experts")
    warn_mixed_dtypes(readers)
    if not method.uses_base:
        return readers, None
    if base is None:
        raise ValueError(f"method {method.name!r} needs the base model the experts were fine-tuned from (--base, or models/base in the pipeline)")
    base_reader = CheckpointReader(base)
    check_same_tensors(readers[0], base_reader, "experts and base")
    check_same_config(readers[0].path, base_reader.path, "experts and base")
    return readers, base_reader


def open_grams(grams: Sequence[str | Path], experts: Sequence[str | Path], method: MergeMethod, *, verify: bool) -> list[GramDir]:
    """The experts' gram directories (one each, for `uses_grams` methods), matched to their experts
    and, with `verify`, checked against their SHA-256 (DVC does not rehash what it pulls or caches)."""
    if not method.uses_grams:
        return []
    if len(grams) != len(experts):
        raise ValueError(f"method {method.name!r} needs one gram directory per expert: {len(experts)} experts, {len(grams)} gram dirs (--gram)")
    gram_dirs = [GramDir.open(g) for g in grams]
    check_grams_match(gram_dirs, experts)
    if verify:
        for g in tqdm(gram_dirs, desc="verify grams (SHA-256)", unit="dir"):
            g.verify()
    return gram_dirs


def open_fishers(method: MergeMethod, fisher: Sequence[str | Path], readers: Sequence[CheckpointReader], *, verify: bool) -> list[FisherDir]:
    """The experts' Fisher directories, for methods that read them (`uses_fisher`), checked: one per
    expert, of that expert, naming only tensors of the model; [] for other methods."""
    if not getattr(method, "uses_fisher", False):
        return []
    if len(fisher) != len(readers):
        raise ValueError(f"method {method.name!r} needs one Fisher directory per expert: {len(readers)} experts, {len(fisher)} Fisher dirs (--fisher)")
    dirs = [FisherDir.open(f) for f in fisher]
    check_fisher_match(dirs, [r.path for r in readers])
    for d in dirs:
        if verify:
            d.verify()
        unknown = sorted(set(d.tensors) - set(readers[0].specs))
        if unknown:
            raise ValueError(f"{d.path}: has a Fisher for {unknown[0]!r}, which is not a tensor of {readers[0].path}; was it computed for another model?")
    return dirs


def stream_blocks(spec: TensorSpec, method: MergeMethod, inputs: int) -> list[Optional[slice]]:
    """The row blocks `merge_tensor` reads: for a streaming method (`block_copies`), blocks whose
    working set fits STREAM_BYTES; else whole tensors, or BLOCK_BYTES blocks when row-separable."""
    copies = method.block_copies(inputs)
    if copies is None:
        return row_blocks(spec, method.row_separable, BLOCK_BYTES)
    return row_blocks(spec, True, STREAM_BYTES // max(1, copies))


def merge_tensor(spec: TensorSpec, method: MergeMethod, readers: Sequence[CheckpointReader], base: Optional[CheckpointReader], *, check_magnitudes: bool,
                 joint: Optional[JointSolve] = None, fishers: Sequence[FisherDir] = ()) -> Iterator[torch.Tensor]:
    """The merged tensor `spec`, block of rows by block of rows (one block unless huge and row-separable,
    or streaming); methods that read a Fisher get each expert's Fisher of the same rows (`fishers`);
    streaming methods with `statistics` get them gathered over every block first (`stats=`)."""
    if joint and joint.module_of(spec.name):
        yield from merge_joint(spec, joint, method, readers, base, check_magnitudes=check_magnitudes)
        return
    handles = method.gram_handles(spec.name) if method.uses_grams else None
    inputs = len(readers) + (base is not None)
    blocks = stream_blocks(spec, method, inputs)
    read = lambda rows: ([check_finite(r.get(spec.name, rows), f"{r.path}: {spec.name}") for r in readers],  # noqa: E731
                         check_finite(base.get(spec.name, rows), f"{base.path}: {spec.name}") if base else None)
    stats = method.statistics(spec.name, spec.shape) if method.block_copies(inputs) is not None else None
    for step in range(stats.passes if stats is not None else 0):
        for rows in blocks:
            stats.observe(step, *read(rows))
        stats.end_pass(step)
    for rows in blocks:
        tensors, base_tensor = read(rows)
        extra = {"fisher": [f.get(spec.name, rows) for f in fishers]} if fishers else {}
        if stats is not None:
            extra["stats"] = stats
        merged = check_finite(method.merge(spec.name, tensors, grams=handles, base=base_tensor, **extra), f"merged tensor {spec.name}")
        if merged.shape != tensors[0].shape:
            raise ValueError(f"method {method.name!r} returned shape {tuple(merged.shape)} for {spec.name}, expected {tuple(tensors[0].shape)}")
        if check_magnitudes:
            inputs = [(r.path, t) for r, t in zip(readers, tensors)] + ([(base.path, base_tensor)] if base else [])
            check_magnitude(merged, spec.name, inputs, method.name)
        del tensors, base_tensor
        yield merged.to(spec.dtype)


def plan_joint(method: MergeMethod, gram_dirs: Sequence[GramDir], reader: CheckpointReader) -> Optional[JointSolve]:
    """Conv1D weights and solved biases go through grams/solve.py; None when the model has none.
    A bias solve with grams lacking input sums is refused here, before the first byte."""
    if not gram_dirs:
        return None
    solved = {n.removesuffix(".weight") for n in reader.names() if n.endswith(".weight") and method.gram_handles(n)}
    bias = method.value("regmean_bias", "") if any(p.name == "regmean_bias" for p in method.params) else "average"
    joint = JointSolve.plan({m: gram_dirs[0].modules[m] for m in solved}, reader.names(), bias)
    for g in gram_dirs if joint.biased else ():
        g.load_mean_augmented(min(joint.biased), torch.float32, "cpu")
    return joint if joint.refs else None


def merge_joint(spec: TensorSpec, joint: JointSolve, method: MergeMethod, readers: Sequence[CheckpointReader], base: Optional[CheckpointReader], *,
                check_magnitudes: bool) -> Iterator[torch.Tensor]:
    """The merged `spec` of a Conv1D weight or a solved bias: whole, through `joint`."""
    merged = joint.merge(
        spec.name, lambda n, t, grams, b: method.merge(n, t, grams=grams, base=b),
        lambda n: [check_finite(r.get(n), f"{r.path}: {n}") for r in readers],
        lambda n: check_finite(base.get(n), f"{base.path}: {n}") if base else None,
        lambda m, aug: [replace(h, augmented=aug) for h in method.gram_handles(f"{m}.weight")],
    )
    if tuple(merged.shape) != tuple(spec.shape):
        raise ValueError(f"method {method.name!r} returned shape {tuple(merged.shape)} for {spec.name}, expected {tuple(spec.shape)}")
    if check_magnitudes:
        check_magnitude(merged, spec.name, [(r.path, r.get(spec.name)) for r in readers], method.name)
    yield check_finite(merged, f"merged tensor {spec.name}").to(spec.dtype)


@dataclass(frozen=True)
class Checks:
    """The engine's guards a user may turn off: the SHA-256 of gram and Fisher files (DVC does not
    rehash what it pulls or caches: a flipped bit would merge silently), and the |value| bound on
    merged weights (MAX_ABS_WEIGHT: a flipped exponent bit in an expert)."""

    verify_inputs: bool = True
    magnitudes: bool = True


def merge_models(
    experts: Sequence[str | Path],
    method: MergeMethod,
    out: str | Path,
    *,
    grams: Sequence[str | Path] = (),
    base: Optional[str | Path] = None,
    lm_head: bool = False,
    device: str = "cpu",
    max_shard_size: int = 5 * 2**30,
    overwrite: bool = True,
    checks: Checks = Checks(),
    fisher: Sequence[str | Path] = (),
) -> dict:
    """Merge `experts` with `method` into the HF directory `out`; return the saved merge config.

    `lm_head`: gram methods solve the output layer too (RegMean; never when tied); `device`: where
    the method computes (cpu, cuda, auto). An existing `out` is replaced only with `overwrite` and
    only if it is a merged model written by mergeflow that holds nothing else (`atomic.check_replaceable`);
    tensors go in the order of the method's `group` (work shared inside a group is done once)."""
    out = Path(out)
    fix_mmap_threshold()  # row blocks freed go back to the OS, not into a fragmented heap (heap.py)
    check_replaceable(out, force=overwrite, inputs=[*experts, *grams, *fisher, *([base] if base is not None else [])], owned_files=merged_files, what="merged model")
    readers, base_reader = open_experts(experts, method, base)
    gram_dirs = open_grams(grams, experts, method, verify=checks.verify_inputs)
    fisher_dirs = open_fishers(method, fisher, readers, verify=checks.verify_inputs)
    method.prepare(readers[0].names(), num_experts=len(experts), device=device)
    if gram_dirs:
        method.use_grams(gram_dirs, readers[0], lm_head=lm_head)
    joint = plan_joint(method, gram_dirs, readers[0])
    specs = sorted((readers[0].specs[name] for name in readers[0].names()), key=lambda spec: (method.group(spec.name), spec.name))
    needed = sum(spec.nbytes for spec in specs)
    check_disk_space(out, needed)
    fault_point("merge:checked")

    with full_disk_reported(lambda: disk_full_message(out, needed)), atomic_dir(out) as tmp:
        writer = ShardedWriter(tmp, specs, max_shard_size)
        for spec in tqdm(specs, desc=f"merge ({method.name})", unit="tensor"):
            for merged in merge_tensor(spec, method, readers, base_reader, check_magnitudes=checks.magnitudes, joint=joint, fishers=fisher_dirs):
                writer.write(spec.name, merged)
                fault_point("merge:tensor-written")
                del merged
        writer.close()
        fault_point("merge:shards-written")
        copy_model_files(experts[0], tmp)
        config = merge_config(method, experts, base if base_reader else None, gram_dirs, fisher_dirs)
        (tmp / "README.md").write_text(model_card(config))
        config["files"] = sorted({p.name for p in tmp.iterdir()} | {MERGE_CONFIG})  # what --force may replace later
        write_json(tmp / MERGE_CONFIG, config)
        fault_point("merge:files-written")
    log.info("merged %d tensors of %d experts with %s -> %s", len(specs), len(experts), method.name, out)
    return config


def merge_config(method: MergeMethod, experts: Sequence[str | Path], base: Optional[str | Path], gram_dirs: Sequence[GramDir], fisher_dirs: Sequence[FisherDir]) -> dict:
    """What mergeflow_merge.json records: the method and its params, the inputs it read, its report."""
    return {
        **method.config(),
        "experts": [str(e) for e in experts],
        "base": str(base) if base is not None else None,
        "grams": [str(g.path) for g in gram_dirs],
        "num_tokens": [g.num_tokens for g in gram_dirs],
        "gram_reductions": [g.reduction for g in gram_dirs],
        **({"fisher": [str(f.path) for f in fisher_dirs]} if fisher_dirs else {}),
        **method.report(),
    }


def model_card(config: dict) -> str:
    return (
        "---\nlibrary_name: transformers\ntags: [merge, mergeflow]\n---\n"
        f"# Merged model ({config['method']})\n\n"
        "Merged with mergeflow from:\n\n"
        + "".join(f"- `{e}`\n" for e in config["experts"])
        + f"\nMerge configuration (also in `{MERGE_CONFIG}`):\n\n```json\n{json.dumps(config, indent=2)}\n```\n"
    )
