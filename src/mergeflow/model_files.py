"""Lazy reading of (sharded) safetensors checkpoints and streaming, sharded writing of merged ones.

Reading goes through `safe_open`, one tensor (or one block of rows) at a time, via
`model.safetensors.index.json` when the checkpoint is sharded; shapes and dtypes come from the
headers without loading data.

Writing streams too. safetensors' own `save_file` needs every tensor of a file in memory at once,
which for a 128256 x 4096 embedding alone is 2 GiB; but the format is simple and documented (an
8-byte little-endian header length, a JSON header of dtypes, shapes and byte offsets padded to 8
bytes, then the raw little-endian data), and every tensor's shape and dtype is known before the
merge starts. So the shards are planned up front, each file's header is written first, and tensors
are appended block by block: memory is bounded by one block, not by a tensor or a shard. Files are
read back with `safe_open` like any other.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

import torch
from safetensors import SafetensorError, safe_open

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".safetensors.index.json", ".bin.index.json")
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
CODES = {dtype: code for code, dtype in DTYPES.items()}
# Floating dtypes by the names params, configs and the CLI use (`float32`, `bfloat16`, ...); a
# dtype's size in bytes is `torch_dtype(name).itemsize`.
NAMED_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Largest block of rows a tensor is streamed in (reading, merging, writing): memory per tensor.
BLOCK_BYTES = 256 * 2**20
# A streaming merge method's working set per block (`MergeMethod.block_copies` float32 copies of
# it): a quarter of BLOCK_BYTES keeps every method under RegMean's peak on SmolLM2's shapes, where
# RegMean holds one float32 copy of the 108 MiB embedding (benchmarks/README.md, "Merge methods").
STREAM_BYTES = BLOCK_BYTES // 4
CONFIG = "config.json"


def torch_dtype(name: str) -> torch.dtype:
    """`float32` -> torch.float32, for the floating dtypes of NAMED_DTYPES."""
    if name not in NAMED_DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(NAMED_DTYPES)}")
    return NAMED_DTYPES[name]


def require_model_dir(model_dir: str | Path, expected: str = "expected a Hugging Face model directory") -> Path:
    """`model_dir` as a Path, or one line saying it holds no config.json (and what was `expected`)."""
    model_dir = Path(model_dir)
    if not (model_dir / CONFIG).is_file():
        raise FileNotFoundError(f"{model_dir}: no {CONFIG}; {expected}")
    return model_dir


def model_config(model_dir: str | Path) -> dict:
    """A model's config.json ({} when it has none); invalid JSON is one line naming the file."""
    path = Path(model_dir) / CONFIG
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); restore the model's {CONFIG}") from None


def is_tied(config: dict) -> bool:
    """Whether lm_head shares the input embeddings (a multimodal config keeps it in text_config)."""
    return bool(config.get("tie_word_embeddings", (config.get("text_config") or {}).get("tie_word_embeddings", False)))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def open_safetensors(path: Path):
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err}); it may be truncated or corrupt, download or recompute it") from None


class CheckpointReader:
    """Names, shapes and tensors of a HF model directory, without loading it whole."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if (self.path / INDEX).is_file():
            weight_map = json.loads((self.path / INDEX).read_text())["weight_map"]
        elif (self.path / SINGLE).is_file():
            with open_safetensors(self.path / SINGLE) as f:
                weight_map = {name: SINGLE for name in f.keys()}
        else:
            raise FileNotFoundError(f"{self.path}: neither {SINGLE} nor {INDEX}; expected a safetensors model directory")
        self.weight_map: dict[str, str] = dict(weight_map)
        self.specs: dict[str, TensorSpec] = {}
        for file in sorted(set(self.weight_map.values())):
            if not (self.path / file).is_file():
                raise FileNotFoundError(f"{self.path / file}: shard listed in {INDEX} is missing")
            with open_safetensors(self.path / file) as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    self.specs[name] = TensorSpec(name, tuple(sl.get_shape()), DTYPES[sl.get_dtype()])

    def names(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.specs[name].shape

    def get(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """The tensor `name`, or only its block of rows `rows` (first dimension)."""
        with open_safetensors(self.path / self.weight_map[name]) as f:
            if rows is None:
                return f.get_tensor(name)
            return f.get_slice(name)[rows]


def parse_size(text: str) -> int:
    """'500MB' -> 500_000_000; '5GiB' -> 5 * 2**30; a bare number is bytes."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    upper = str(text).strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            upper, scale = upper[: -len(unit)], factor
            break
    else:
        scale = 1
    try:
        size = int(float(upper) * scale)
    except ValueError:
        size = 0
    if size < 1:
        raise ValueError(f"{text!r} is not a size such as 500MB or 5GB (merge.max_shard_size, or --max-shard-size)")
    return size


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Greedy, in order: a new shard starts when the next tensor would pass `max_shard_size`."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


class ShardedWriter:
    """Writes the tensors of `specs`, in that order and block by block, into HF-style shards."""

    def __init__(self, out: str | Path, specs: Sequence[TensorSpec], max_shard_size: int = 5 * 2**30):
        self.out = Path(out)
        self.shards = plan_shards(specs, max_shard_size)
        n = len(self.shards)
        self.files = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._queue = [(i, spec) for i, shard in enumerate(self.shards) for spec in shard]
        self._pos = 0  # index into _queue of the tensor being written
        self._left = self._queue[0][1].nbytes if self._queue else 0
        self._file: BinaryIO | None = None
        self._open_shard(0)

    def _open_shard(self, i: int) -> None:
        if self._file:
            self._file.close()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for spec in self.shards[i]:
            header[spec.name] = {"dtype": CODES[spec.dtype], "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)
        self._file = open(self.out / self.files[i], "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, block: torch.Tensor) -> None:
        """Append `block` (the whole tensor, or its next rows) to tensor `name`."""
        shard, spec = self._queue[self._pos]
        if name != spec.name or block.dtype != spec.dtype:
            raise RuntimeError(f"writer expected {spec.name} ({spec.dtype}) next, got {name} ({block.dtype})")
        data = block.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes > self._left:
            raise RuntimeError(f"{name}: {data.nbytes} bytes written past the tensor's end")
        self._file.write(memoryview(data))
        self._left -= data.nbytes
        if self._left == 0 and self._pos + 1 < len(self._queue):
            self._pos += 1
            next_shard, next_spec = self._queue[self._pos]
            self._left = next_spec.nbytes
            if next_shard != shard:
                self._open_shard(next_shard)

    def close(self) -> None:
        if self._pos + 1 != len(self._queue) or self._left:
            raise RuntimeError(f"writer closed before {self._queue[self._pos][1].name} and the tensors after it were written")
        self._file.close()
        if len(self.files) > 1:
            weight_map = {spec.name: self.files[i] for i, shard in enumerate(self.shards) for spec in shard}
            total = sum(spec.nbytes for shard in self.shards for spec in shard)
            (self.out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def copy_model_files(src: str | Path, dst: str | Path) -> None:
    """Copy config, generation config and tokenizer files (everything but weights and the card)."""
    for item in sorted(Path(src).iterdir()):
        if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES) and item.name not in ("README.md", "mergeflow_merge.json"):
            shutil.copy2(item, Path(dst) / item.name)
