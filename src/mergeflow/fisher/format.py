"""The on-disk Fisher format, `mergeflow.fisher/1`.

A Fisher directory holds `fisher.json` and safetensors shards, one per transformer layer as grams
(`layer_000.safetensors`, ..., `other.safetensors` for embeddings, final norm and lm_head):

    {"format": "mergeflow.fisher/1", "estimator": "empirical", "num_examples": N, "dtype": "float32",
     "model": "<expert dir>", "model_id": "<grams.format.model_identity>", "calibration": {...},
     "tensors": {"model.layers.0.mlp.up_proj.weight": "layer_000.safetensors", ...},
     "files": {"layer_000.safetensors": {"bytes": 1234, "sha256": "..."}, ...}}

Each tensor is the diagonal Fisher of the parameter of the same name and shape: the mean over the
calibration rows of the squared gradient of the row's log-likelihood (`compute.py`). A directory
written for a method that reads no Fisher is a marker: `"skipped"` says why, and `tensors` and
`files` are empty, so that the pipeline's `fisher@<expert>` stage costs nothing then.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
from safetensors.torch import save_file

from ..atomic import atomic_dir, check_replaceable, umask, write_json
from ..model_files import open_safetensors
from ..grams.format import disk_errors, file_for, file_record, model_identity, read_index, sha256_of

FORMAT = "mergeflow.fisher/1"
INDEX = "fisher.json"


def owned_files(out: Path) -> Optional[set[str]]:
    """The files of a Fisher directory mergeflow wrote (fisher.json and what it lists), else None."""
    try:
        meta = json.loads((out / INDEX).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None
    return {INDEX, *(meta.get("files") or {}), *(meta.get("tensors") or {}).values()}


def check_fisher_output(out: str | Path, *, inputs: Sequence[str | Path]) -> None:
    """Refuse to write over anything but an earlier Fisher directory (never an input, a file or foreign files)."""
    check_replaceable(out, force=True, inputs=inputs, owned_files=owned_files, what="Fisher", option="--out")


def write_marker(out: str | Path, reason: str, *, inputs: Sequence[str | Path] = ()) -> None:
    """An empty Fisher directory saying why nothing was computed (a method that reads none)."""
    check_fisher_output(out, inputs=inputs)
    with atomic_dir(out) as tmp:
        write_json(tmp / INDEX, {"format": FORMAT, "skipped": reason, "tensors": {}, "files": {}})


def write_fisher(out: str | Path, fisher: Mapping[str, torch.Tensor], dtype: torch.dtype, **meta) -> None:
    """Write `fisher` (parameter name -> diagonal Fisher) atomically, one shard per layer."""
    files: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in fisher.items():
        files.setdefault(file_for(name), {})[name] = tensor
    with atomic_dir(out) as tmp:
        records = {}
        for file, tensors in sorted(files.items()):
            with disk_errors(tmp / file):
                save_file({k: v.to(dtype).contiguous() for k, v in sorted(tensors.items())}, str(tmp / file), metadata={"format": FORMAT})
            os.chmod(tmp / file, 0o666 & ~umask())
            records[file] = file_record(tmp / file)
        write_json(tmp / INDEX, {
            "format": FORMAT, "dtype": str(dtype).removeprefix("torch."), **meta,
            "tensors": {name: file_for(name) for name in sorted(fisher)}, "files": records,
        })


@dataclass(frozen=True)
class FisherDir:
    """A validated Fisher directory; tensors are read lazily, one (block of rows) at a time."""

    path: Path
    tensors: Mapping[str, str]
    files: Mapping[str, Mapping] = field(default_factory=dict)
    model_id: Optional[str] = None
    skipped: Optional[str] = None

    @classmethod
    def open(cls, path: str | Path) -> "FisherDir":
        path = Path(path)
        index = path / INDEX
        meta = read_index(index, "a Fisher directory written by `mergeflow fisher`",
                          lambda: "recompute it with `mergeflow fisher` (or `dvc repro -f fisher@<expert>`)")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{index}: format {meta.get('format') if isinstance(meta, dict) else None!r} is not {FORMAT!r}")
        if meta.get("skipped"):
            raise ValueError(f"{path}: holds no Fisher ({meta['skipped']}); compute it: `dvc repro fisher` with method: fisher in params.yaml, "
                             "or `mergeflow fisher --model EXPERT --data CALIB.jsonl --out DIR`")
        files = meta.get("files") or {}
        for file, record in sorted(files.items()):
            actual = (path / file).stat().st_size if (path / file).is_file() else None
            if actual != record.get("bytes"):
                raise ValueError(f"{path / file}: {'missing' if actual is None else f'{actual} bytes'}, but {index} records {record.get('bytes')} bytes; "
                                 "recompute the Fisher (`dvc repro -f fisher@<expert>`) or pull it again")
        return cls(path, dict(meta.get("tensors") or {}), files, meta.get("model_id"))

    def verify(self) -> None:
        """Check every file's SHA-256 against fisher.json (DVC does not rehash what it pulls)."""
        for file, record in sorted(self.files.items()):
            if sha256_of(self.path / file) != record.get("sha256"):
                raise ValueError(f"{self.path / file}: SHA-256 differs from the one in {self.path / INDEX}; the file is corrupt: recompute or pull it again")

    def get(self, name: str, rows: Optional[slice] = None) -> Optional[torch.Tensor]:
        """The Fisher of parameter `name` (only `rows` when given), or None when it has none."""
        file = self.tensors.get(name)
        if file is None:
            return None
        with open_safetensors(self.path / file) as f:
            return f.get_tensor(name) if rows is None else f.get_slice(name)[rows]


def check_fisher_match(fishers: Sequence[FisherDir], experts: Sequence[str | Path]) -> None:
    """Refuse a Fisher directory computed for another model than its expert (by `model_id`)."""
    for f, expert in zip(fishers, experts):
        own = model_identity(expert)
        if f.model_id and own and f.model_id != own:
            raise ValueError(f"{f.path}: the Fisher of another model, not of {expert}; list the Fisher directories in the order of the experts, "
                             "or recompute it (`dvc repro -f fisher@<expert>`)")
