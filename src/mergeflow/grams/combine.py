"""Adding gram directories: grams are sums over tokens, so slices of the data computed apart
(`mergeflow grams --shard i/n`, on different machines) add up to the grams of the whole.

Nothing is trusted: every part's files are checked against the SHA-256 in its grams.json before
anything is added, and the parts must be distinct slices of one run: the same model (`model_id`),
the same calibration selection (`calibration`) and no shard twice."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from ..atomic import atomic_dir
from ..model_files import open_safetensors
from .data import parse_shard
from .format import INDEX, GramDir, GramWriter, check_gram_output

log = logging.getLogger(__name__)


def sum_grams(parts: Sequence[str | Path], out: str | Path, *, overwrite: bool = True) -> GramDir:
    """Write the sum of the gram directories `parts` (same model, summed grams) to `out` (an
    existing gram directory there is replaced only with `overwrite`, never a part)."""
    if len(parts) < 2:
        raise ValueError(f"need at least two gram directories to add, got {len(parts)}")
    check_gram_output(out, force=overwrite, inputs=parts)
    dirs = [GramDir.open(p) for p in parts]
    first = dirs[0]
    for d in dirs:
        if d.reduction != "sum":
            raise ValueError(f"{d.path / INDEX}: holds mean grams without token counts; only summed grams (from `mergeflow grams`) can be added")
        if d.modules != first.modules:
            raise ValueError(f"{d.path / INDEX}: lists other modules than {first.path / INDEX}; the parts must come from one model and one command")
    check_parts(dirs)
    for d in dirs:
        d.verify()
    files = sorted({ref.file for ref in first.modules.values()})
    with atomic_dir(out) as tmp:
        writer = GramWriter(tmp)
        for file in files:
            keys = sorted({k for ref in first.modules.values() if ref.file == file for k in (ref.key, ref.input_sum) if k})
            total: dict[str, torch.Tensor] = {}
            dtype = None
            for d in dirs:
                with open_safetensors(d.path / file) as f:
                    for key in keys:
                        t = f.get_tensor(key)
                        if key in total and t.shape != total[key].shape:
                            raise ValueError(f"{d.path / file}: {key} has shape {tuple(t.shape)}, {tuple(total[key].shape)} in {first.path / file}")
                        dtype = t.dtype
                        total[key] = total[key].add_(t) if key in total else t.to(torch.float64)
            writer.write_file(file, total, dtype, first.format)
            del total
        writer.finish(
            dict(first.modules), num_tokens=sum(d.num_tokens for d in dirs), model=first.model,
            dtype=str(dtype).removeprefix("torch."), parts=[str(d.path) for d in dirs],
            model_id=first.model_id, calibration=first.calibration, shards=[d.shard or "0/1" for d in dirs],
            **({"output_layer": first.output_layer} if first.output_layer != "lm_head" else {}),
        )
    log.info("added %d gram directories (%d tokens) -> %s", len(dirs), sum(d.num_tokens for d in dirs), out)
    return GramDir.open(out)


def check_parts(dirs: Sequence[GramDir]) -> None:
    """Refuse parts that are not distinct slices of one run (one line naming the part and why)."""
    first = dirs[0]
    _, count = parse_shard(first.shard)
    seen: dict[int, GramDir] = {}
    for d in dirs:
        if d.calibration is None:
            raise ValueError(f"{d.path / INDEX}: records no calibration or model_id (written by an older mergeflow), so it cannot be checked against the other parts; recompute it")
        if d.model_id != first.model_id:
            raise ValueError(f"{d.path}: grams of another model ({d.model}) than {first.path} ({first.model}); only slices of one expert's grams can be added")
        if d.calibration != first.calibration:
            differ = sorted(k for k in {*d.calibration, *first.calibration} if d.calibration.get(k) != first.calibration.get(k))
            shown = ", ".join(f"{k} {first.calibration.get(k)!r} vs {d.calibration.get(k)!r}" for k in differ[:3])
            raise ValueError(f"{d.path}: computed on other calibration data than {first.path} ({shown}); only slices of one calibration run can be added")
        index, of = parse_shard(d.shard)
        if of != count:
            raise ValueError(f"{d.path}: shard {index}/{of}, but {first.path} is one of {count} shards; add the slices of one --shard i/n split")
        if index in seen:
            raise ValueError(f"{d.path}: shard {index}/{of} again (also {seen[index].path}); each slice may be added once")
        seen[index] = d
    if len(seen) < count:
        log.warning("adding %d of %d shards (missing %s): the sum holds only part of the calibration rows", len(seen), count, sorted(set(range(count)) - set(seen)))
