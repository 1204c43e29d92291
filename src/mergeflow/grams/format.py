"""The on-disk gram format, `mergeflow.grams/1`.

A gram directory holds `grams.json` and one or more `.safetensors` files (one per transformer
layer, so a partial pull or a corrupted file touches one layer only):

    {"format": "mergeflow.grams/1", "reduction": "sum", "num_tokens": N, "dtype": "float32",
     "model": "<where the grams came from>",
     "modules": {"model.layers.0.self_attn.q_proj": {"file": "layer_000.safetensors",
                                                     "key": "model.layers.0.self_attn.q_proj"}, ...},
     "files": {"layer_000.safetensors": {"bytes": 1234, "sha256": "..."}, ...}}

With `"reduction": "sum"` (what `mergeflow grams` writes) each tensor is the `[in, in]` SUM of
`x x^T` over the `num_tokens` non-padding tokens that reached that Linear; with `"mean"` (imported
published grams) it is already a per-token mean and `num_tokens` may be null. Modules that see the
same input (q/k/v, gate/up) point to the same key, so each distinct input is stored once.
`files` records each file's size (checked on every open, which catches truncation) and SHA-256
(checked by `mergeflow grams verify`, which catches any corruption). Directories written before
`reduction` and `files` existed are read as sums without integrity records.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping, Optional

import torch
from safetensors.torch import save_file

from ..checkpoint import open_safetensors
from ..io import atomic_dir, umask, write_json

FORMAT = "mergeflow.grams/1"
INDEX = "grams.json"
_LAYER = re.compile(r"\.layers\.(\d+)\.")
# A corrupt file in the workspace is the corrupt object in DVC's cache (outputs are hard links into
# it), and `dvc checkout`/`dvc pull --force` re-link that same object: it must be deleted first.
RECOVER = (
    'delete the corrupt object from the DVC cache, then fetch or recompute the directory: '
    '`find "$(dvc cache dir)" -samefile FILE -delete && rm -rf DIR && dvc pull gram@<expert>` '
    "(or `dvc repro -f gram@<expert>` instead of the pull)"
)


@dataclass(frozen=True)
class GramRef:
    file: str
    key: str


def sha256_of(path: Path, chunk: int = 2**24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class GramDir:
    """A validated gram directory; tensors are read lazily, one module at a time."""

    path: Path
    num_tokens: Optional[int]
    model: str
    modules: Mapping[str, GramRef]
    reduction: Literal["sum", "mean"] = "sum"
    files: Mapping[str, Mapping] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> "GramDir":
        path = Path(path)
        index = path / INDEX
        if not index.is_file():
            raise FileNotFoundError(f"{index}: not found; is {path} a gram directory written by `mergeflow grams`?")
        try:
            meta = json.loads(index.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{index}: not valid JSON ({err}); {RECOVER}") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{index}: format {meta.get('format')!r} is not {FORMAT!r}")
        reduction = meta.get("reduction", "sum")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"{index}: reduction must be 'sum' or 'mean', got {reduction!r}")
        num_tokens = meta.get("num_tokens")
        if reduction == "sum" and (not isinstance(num_tokens, int) or num_tokens < 1):
            raise ValueError(f"{index}: num_tokens must be a positive integer for summed grams, got {num_tokens!r}")
        modules = {name: GramRef(ref["file"], ref["key"]) for name, ref in meta.get("modules", {}).items()}
        if not modules:
            raise ValueError(f"{index}: lists no modules")
        files = meta.get("files") or {}
        for file in sorted({ref.file for ref in modules.values()}):
            if not (path / file).is_file():
                raise FileNotFoundError(f"{path / file}: listed in {index} but missing; {RECOVER}")
            expected = files.get(file, {}).get("bytes")
            actual = (path / file).stat().st_size
            if expected is not None and expected != actual:
                raise ValueError(f"{path / file}: {actual} bytes, but {index} records {expected}; the file is truncated or corrupt: {RECOVER}")
            with open_safetensors(path / file) as f:
                keys = set(f.keys())
            missing = sorted({ref.key for ref in modules.values() if ref.file == file} - keys)
            if missing:
                raise ValueError(f"{path / file}: lacks tensors {missing[:3]} that {index} points to; {RECOVER}")
        return cls(path, num_tokens, str(meta.get("model", "")), modules, reduction, files)

    def verify(self) -> list[str]:
        """Check every file's SHA-256 against `grams.json`; return the files checked."""
        checked = []
        for file, record in sorted(self.files.items()):
            if "sha256" in record and sha256_of(self.path / file) != record["sha256"]:
                raise ValueError(f"{self.path / file}: SHA-256 differs from the one in {self.path / INDEX}; the file is corrupt: {RECOVER}")
            checked.append(file)
        return checked

    def shape(self, module: str) -> tuple[int, ...]:
        ref = self.modules[module]
        with open_safetensors(self.path / ref.file) as f:
            return tuple(f.get_slice(ref.key).get_shape())

    def load(self, module: str) -> torch.Tensor:
        """The stored gram of `module` (a sum or a mean, see `reduction`), `[in, in]`."""
        if module not in self.modules:
            raise KeyError(f"{self.path / INDEX}: no gram for module {module!r}")
        ref = self.modules[module]
        with open_safetensors(self.path / ref.file) as f:
            return f.get_tensor(ref.key)

    def load_mean(self, module: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
        """The per-token mean gram of `module`, whichever reduction is stored."""
        gram = self.load(module).to(device=device, dtype=dtype)  # a copy: the loaded tensor maps the file
        return gram.div_(self.num_tokens) if self.reduction == "sum" else gram


def file_for(module: str) -> str:
    """One safetensors file per transformer layer; anything outside the layers goes to `other`."""
    match = _LAYER.search(f".{module}.")
    return f"layer_{int(match.group(1)):03d}.safetensors" if match else "other.safetensors"


class GramWriter:
    """Writes a gram directory file by file (so a caller never holds every layer at once), then
    `grams.json` with each file's size and hash. Use inside `atomic_dir`."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.files: dict[str, dict] = {}
        self.modules: dict[str, dict] = {}

    def write_file(self, file: str, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> None:
        if file in self.files:
            raise ValueError(f"{file} written twice")
        save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(self.out / file), metadata={"format": FORMAT})
        self.add_file(file)

    def add_file(self, file: str) -> None:
        """Record a file already placed in the directory (readable as the umask allows, like grams.json)."""
        os.chmod(self.out / file, 0o666 & ~umask())
        self.files[file] = {"bytes": (self.out / file).stat().st_size, "sha256": sha256_of(self.out / file)}

    def finish(self, keys: Mapping[str, str], *, num_tokens: Optional[int], model: str, reduction: str = "sum", dtype: str = "float32", **extra) -> None:
        """`keys`: module -> the stored key it reads (its own, or the module whose input it shares)."""
        write_json(
            self.out / INDEX,
            {
                "format": FORMAT,
                "reduction": reduction,
                "num_tokens": int(num_tokens) if num_tokens is not None else None,
                "model": model,
                "dtype": dtype,
                **extra,
                "modules": {m: {"file": file_for(k), "key": k} for m, k in sorted(keys.items())},
                "files": dict(sorted(self.files.items())),
            },
        )


def write_grams(
    out: str | Path, sums: Mapping[str, torch.Tensor], keys: Mapping[str, str], num_tokens: Optional[int], model: str,
    *, reduction: str = "sum", dtype: torch.dtype = torch.float32, **extra,
) -> None:
    """Write `sums` (key -> gram) and the module -> key map `keys` atomically as a gram directory."""
    files: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in sums.items():
        files.setdefault(file_for(key), {})[key] = tensor
    with atomic_dir(out) as tmp:
        writer = GramWriter(tmp)
        for file, tensors in sorted(files.items()):
            writer.write_file(file, tensors, dtype)
        writer.finish(keys, num_tokens=num_tokens, model=model, reduction=reduction, dtype=str(dtype).removeprefix("torch."), **extra)
