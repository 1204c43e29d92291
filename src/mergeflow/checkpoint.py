"""Lazy reading of (sharded) safetensors checkpoints and atomic, sharded writing of merged ones.

Reading goes through `safe_open`, one tensor at a time, via `model.safetensors.index.json` when
the checkpoint is sharded; shapes and dtypes come from the headers without loading data. Writing
flushes a shard whenever `max_shard_size` bytes are buffered, so peak memory is bounded by a shard,
not by the model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".safetensors.index.json", ".bin.index.json")


class CheckpointReader:
    """Names, shapes and tensors of a HF model directory, without loading it whole."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if (self.path / INDEX).is_file():
            weight_map = json.loads((self.path / INDEX).read_text())["weight_map"]
        elif (self.path / SINGLE).is_file():
            with safe_open(self.path / SINGLE, framework="pt") as f:
                weight_map = {name: SINGLE for name in f.keys()}
        else:
            raise FileNotFoundError(f"{self.path}: neither {SINGLE} nor {INDEX}; expected a safetensors model directory")
        self.weight_map: dict[str, str] = dict(weight_map)
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        for file in sorted(set(self.weight_map.values())):
            if not (self.path / file).is_file():
                raise FileNotFoundError(f"{self.path / file}: shard listed in {INDEX} is missing")
            with safe_open(self.path / file, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    self._meta[name] = (tuple(sl.get_shape()), sl.get_dtype())

    def names(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self.path / self.weight_map[name], framework="pt") as f:
            return f.get_tensor(name)


class ShardedWriter:
    """Accumulates tensors and writes HF-style shards (`model-0000i-of-0000n.safetensors` + index)."""

    def __init__(self, out: Path, max_shard_size: int = 5 * 2**30):
        self.out, self.max_shard_size = Path(out), max_shard_size
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered = 0
        self._shards: list[list[str]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffered + size > self.max_shard_size:
            self._flush()
        self._buffer[name] = tensor.contiguous()
        self._buffered += size

    def _flush(self) -> None:
        save_file(self._buffer, str(self.out / f".part-{len(self._shards):05d}.safetensors"), metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self._buffer, self._buffered = {}, 0

    def close(self) -> None:
        if self._buffer or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            (self.out / ".part-00000.safetensors").rename(self.out / SINGLE)
            return
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out / f".part-{i:05d}.safetensors").rename(self.out / final)
            weight_map.update({name: final for name in names})
        (self.out / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2) + "\n")


def copy_model_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy config, generation config and tokenizer files (everything but weights and the card)."""
    copied = []
    for item in sorted(Path(src).iterdir()):
        if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES) and item.name not in ("README.md", "mergeflow_merge.json"):
            shutil.copy2(item, Path(dst) / item.name)
            copied.append(item.name)
    return copied
