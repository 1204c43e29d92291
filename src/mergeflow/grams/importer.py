"""Importing published grams (the RegMean reference's `gram.pkl`) without running pickle code.

The reference stores a plain pickled dict: module name -> float32 `[in, in]` tensor, each a running
per-token MEAN over all positions (padding included, no token count), `lm_head` included, q/k/v
and gate/up stored separately although identical. A pickle can name any Python callable to run
while loading, so it is read with a restricted unpickler that resolves only what tensors are made
of (`torch._utils._rebuild_tensor_v2`, `torch.storage._load_from_bytes` — whose storage bytes are
then loaded by `torch.load(weights_only=True)` — and `collections.OrderedDict`) and refuses
everything else before it can run. Files written by `torch.save` (zip) are read with
`torch.load(weights_only=True, mmap=True)`.

Memory: a pickle holds each tensor's bytes inline, so every tensor is spilled to disk as soon as it
is rebuilt; peak memory is about twice the largest gram while reading (2 x 822 MB for Llama-3-8B's
`down_proj`) and one layer's distinct grams while writing (about 1 GB), whatever the file's size.
Identical tensors are detected by hash and stored once. Disk: the spilled distinct grams next to
the output until it is written (about 30 GB for an 8B expert of the reference's 39 GB pickle).
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_dir
from ..model_files import is_tied, model_config
from .format import GramRef, GramWriter, by_file, check_gram_output, disk_errors, format_for, model_identity
from .modules import SolvedModule, discover_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Spilled:
    """A tensor already written to `path` (key `gram`), identified by its content hash."""

    path: Path
    digest: str
    shape: tuple[int, ...]


class _Spiller:
    def __init__(self, folder: Path):
        self.folder = folder
        self.by_digest: dict[str, Spilled] = {}

    def __call__(self, tensor: torch.Tensor) -> Spilled:
        tensor = tensor.detach().contiguous()
        digest = hashlib.sha256(tensor.view(torch.uint8).reshape(-1).numpy()).hexdigest() if tensor.numel() else "empty"
        digest = f"{digest}-{tuple(tensor.shape)}-{tensor.dtype}"
        if digest not in self.by_digest:
            path = self.folder / f"{len(self.by_digest):05d}.safetensors"
            with disk_errors(path):
                save_file({"gram": tensor}, str(path))
            self.by_digest[digest] = Spilled(path, digest, tuple(tensor.shape))
        return self.by_digest[digest]


class _SafeUnpickler(pickle.Unpickler):
    """Resolves only the callables tensors are rebuilt with; each tensor goes straight to disk."""

    def __init__(self, file, spill: _Spiller):
        super().__init__(file)
        self.spill = spill

    def _rebuild(self, storage, offset, size, stride, *rest):
        return self.spill(torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, collections.OrderedDict()))

    @staticmethod
    def _storage(data: bytes):
        return torch.load(io.BytesIO(data), weights_only=True)

    def find_class(self, module: str, name: str):
        allowed = {
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild,
            ("torch.storage", "_load_from_bytes"): self._storage,
            ("collections", "OrderedDict"): collections.OrderedDict,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a gram pickle holds only tensors, and loading this would run code")
        return allowed[(module, name)]


def read_gram_file(path: Path, spill_dir: Path) -> dict[str, Spilled]:
    """module -> spilled tensor, from a plain pickle or a torch.save file, never running its code."""
    spill = _Spiller(spill_dir)
    try:
        if zipfile.is_zipfile(path):
            loaded = torch.load(path, weights_only=True, mmap=True)
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: holds a {type(loaded).__name__}, expected a dict of module name -> gram tensor")
            return {k: spill(v) if isinstance(v, torch.Tensor) else v for k, v in loaded.items()}
        with open(path, "rb") as f:
            loaded = _SafeUnpickler(f, spill).load()
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: {err}") from None
    except (EOFError, zipfile.BadZipFile, RuntimeError) as err:
        raise ValueError(f"{path}: not a readable gram pickle ({type(err).__name__}: {err}); it may be truncated, download it again") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: holds a {type(loaded).__name__}, expected a dict of module name -> gram tensor")
    return loaded


def expected_modules(model: Path) -> dict[str, SolvedModule]:
    """The model's solved modules (`modules.discover`: the block Linears) and its output layer when
    the checkpoint stores one, from config.json and the checkpoint headers."""
    modules, names = discover_dir(model, include_lm_head=True)
    return {name: m for name, m in modules.solved.items() if f"{name}.weight" in names}


def import_grams(path: str | Path, model: str | Path, out: str | Path, *, overwrite: bool = True) -> dict:
    """Convert a published gram pickle into a gram directory of `reduction: mean`; return its index.
    An existing gram directory at `out` is replaced only with `overwrite`."""
    path, model, out = Path(path), Path(model), Path(out)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: gram file not found")
    check_gram_output(out, force=overwrite, inputs=[path, model])
    expected = expected_modules(model)
    tied = is_tied(model_config(model))
    with atomic_dir(out) as tmp:
        spill_dir = tmp / ".spill"
        spill_dir.mkdir()
        grams = read_gram_file(path, spill_dir)
        bad = [k for k, v in grams.items() if not isinstance(v, Spilled)]
        if bad:
            raise ValueError(f"{path}: the values of {bad[:3]} are not tensors")
        if "lm_head" in grams and "lm_head" not in expected and tied:
            log.warning("%s: lm_head is tied to the embeddings in %s; its gram is not imported (it is never solved)", path, model)
            del grams["lm_head"]
        extra = sorted(set(grams) - set(expected))
        missing = sorted(m for m in expected if m != "lm_head" and m not in grams)
        if extra or missing:
            raise ValueError(f"{path}: modules do not match the Linears of {model}: unknown {extra[:3]}, missing {missing[:3]}; were these grams computed for another model?")
        for module, spilled in grams.items():
            n = expected[module].in_features
            if spilled.shape != (n, n):
                raise ValueError(f"{path}: gram of {module} has shape {spilled.shape}, but {module} of {model} takes {n} inputs: expected ({n}, {n})")
        owners: dict[str, str] = {}
        keys = {m: owners.setdefault(s.digest, m) for m, s in grams.items()}  # identical inputs stored once
        writer = GramWriter(tmp)
        refs = {m: GramRef(expected[k].file, k, expected[m].transposed) for m, k in keys.items()}
        for file, members in sorted(by_file(dict.fromkeys(keys.values()), lambda owner: expected[owner].file).items()):
            writer.write_file(file, {m: load_file(grams[m].path)["gram"] for m in members}, version=format_for(refs.values()))
        for spilled in spill_dir.iterdir():
            spilled.unlink()
        spill_dir.rmdir()
        writer.finish(refs, num_tokens=None, model=str(model), reduction="mean", imported_from=path.name, model_id=model_identity(model))
        index = json.loads((tmp / "grams.json").read_text())
    log.info("imported %d module grams (%d distinct) from %s -> %s", len(keys), len(set(keys.values())), path, out)
    return index
