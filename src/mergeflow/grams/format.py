"""The on-disk gram format, `mergeflow.grams/1`.

A gram directory holds `grams.json` and one or more `.safetensors` files (one per transformer
layer, so a partial pull or a corrupted file touches one layer only):

    {"format": "mergeflow.grams/1", "num_tokens": N, "model": "<where the grams came from>",
     "dtype": "float32",
     "modules": {"model.layers.0.self_attn.q_proj": {"file": "layer_000.safetensors",
                                                     "key": "model.layers.0.self_attn.q_proj"}, ...}}

Each tensor is the `[in_features, in_features]` SUM of `x x^T` over the `num_tokens` non-padding
tokens that reached that Linear. Modules that see the same input (q/k/v, gate/up) point to the
same key. The format is validated on open, so a directory from another run or machine is either
understood or refused with the file and module named.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from ..checkpoint import open_safetensors
from ..io import atomic_dir, write_json

FORMAT = "mergeflow.grams/1"
INDEX = "grams.json"
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class GramRef:
    file: str
    key: str


@dataclass(frozen=True)
class GramDir:
    """A validated gram directory; tensors are read lazily, one module at a time."""

    path: Path
    num_tokens: int
    model: str
    modules: Mapping[str, GramRef]

    @classmethod
    def open(cls, path: str | Path) -> "GramDir":
        path = Path(path)
        index = path / INDEX
        if not index.is_file():
            raise FileNotFoundError(f"{index}: not found; is {path} a gram directory written by `mergeflow grams`?")
        try:
            meta = json.loads(index.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{index}: not valid JSON ({err}); recompute the grams or restore them with `dvc checkout`") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{index}: format {meta.get('format')!r} is not {FORMAT!r}")
        num_tokens = meta.get("num_tokens")
        if not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"{index}: num_tokens must be a positive integer, got {num_tokens!r}")
        modules = {name: GramRef(ref["file"], ref["key"]) for name, ref in meta.get("modules", {}).items()}
        if not modules:
            raise ValueError(f"{index}: lists no modules")
        for file in sorted({ref.file for ref in modules.values()}):
            if not (path / file).is_file():
                raise FileNotFoundError(f"{path / file}: listed in {index} but missing; recompute the grams or run `dvc checkout`")
            with open_safetensors(path / file) as f:
                keys = set(f.keys())
            missing = sorted({ref.key for ref in modules.values() if ref.file == file} - keys)
            if missing:
                raise ValueError(f"{path / file}: lacks tensors {missing[:3]} that {index} points to")
        return cls(path, num_tokens, str(meta.get("model", "")), modules)

    def shape(self, module: str) -> tuple[int, ...]:
        ref = self.modules[module]
        with open_safetensors(self.path / ref.file) as f:
            return tuple(f.get_slice(ref.key).get_shape())

    def load(self, module: str) -> torch.Tensor:
        """The summed gram of `module` as float32 `[in, in]`."""
        if module not in self.modules:
            raise KeyError(f"{self.path / INDEX}: no gram for module {module!r}")
        ref = self.modules[module]
        with open_safetensors(self.path / ref.file) as f:
            return f.get_tensor(ref.key)


def file_for(module: str) -> str:
    """One safetensors file per transformer layer; anything outside the layers goes to `other`."""
    match = _LAYER.search(f".{module}.")
    return f"layer_{int(match.group(1)):03d}.safetensors" if match else "other.safetensors"


def write_grams(out: str | Path, sums: Mapping[str, torch.Tensor], keys: Mapping[str, str], num_tokens: int, model: str) -> None:
    """Write `sums` (key -> gram) and the module -> key map `keys` atomically as a gram directory."""
    files: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in sums.items():
        files.setdefault(file_for(key), {})[key] = tensor.to(torch.float32).contiguous()
    with atomic_dir(out) as tmp:
        for file, tensors in sorted(files.items()):
            save_file(tensors, str(tmp / file), metadata={"format": FORMAT})
        write_json(
            tmp / INDEX,
            {
                "format": FORMAT,
                "num_tokens": int(num_tokens),
                "model": model,
                "dtype": "float32",
                "modules": {m: {"file": file_for(k), "key": k} for m, k in sorted(keys.items())},
            },
        )
