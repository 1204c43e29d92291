"""Adding gram directories: grams are sums over tokens, so slices of the data computed apart
(`mergeflow grams --shard i/n`, on different machines) add up to the grams of the whole."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from ..checkpoint import open_safetensors
from ..io import atomic_dir
from .format import INDEX, GramDir, GramWriter

log = logging.getLogger(__name__)


def sum_grams(parts: Sequence[str | Path], out: str | Path) -> GramDir:
    """Write the sum of the gram directories `parts` (same model, summed grams) to `out`."""
    if len(parts) < 2:
        raise ValueError(f"need at least two gram directories to add, got {len(parts)}")
    dirs = [GramDir.open(p) for p in parts]
    first = dirs[0]
    for d in dirs:
        if d.reduction != "sum":
            raise ValueError(f"{d.path / INDEX}: holds mean grams without token counts; only summed grams (from `mergeflow grams`) can be added")
        if {m: r.key for m, r in d.modules.items()} != {m: r.key for m, r in first.modules.items()}:
            raise ValueError(f"{d.path / INDEX}: lists other modules than {first.path / INDEX}; the parts must come from one model and one command")
    files = sorted({ref.file for ref in first.modules.values()})
    with atomic_dir(out) as tmp:
        writer = GramWriter(tmp)
        for file in files:
            keys = sorted({ref.key for ref in first.modules.values() if ref.file == file})
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
            writer.write_file(file, total, dtype)
            del total
        writer.finish(
            {m: r.key for m, r in first.modules.items()}, num_tokens=sum(d.num_tokens for d in dirs), model=first.model,
            dtype=str(dtype).removeprefix("torch."), parts=[str(d.path) for d in dirs],
        )
    log.info("added %d gram directories (%d tokens) -> %s", len(dirs), sum(d.num_tokens for d in dirs), out)
    return GramDir.open(out)
