"""The on-disk gram format, `mergeflow.grams/1` and `mergeflow.grams/2`.

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
Version 2 adds what version 1 cannot say, and is written only when a directory needs it (so grams
of models without either stay byte-identical to version 1's): `"transposed": true` on a module
whose weight is stored `[in, out]` (GPT-2's `Conv1D`), and `"input_sum": "<key>"` naming the `[in]`
sum of the inputs a Linear with a bias sees (beside its gram in the same file), which a
least-squares fit of the bias (`regmean_bias: solve`) needs; `output_layer` names the output layer
when the checkpoint does not call it `lm_head`. Both versions are read.
`files` records each file's size (checked on every open, which catches truncation) and SHA-256
(checked by `mergeflow grams verify`, which catches any corruption). Directories written before
`reduction` and `files` existed are read as sums without integrity records.

What the grams belong to, so they cannot be mixed up silently: `model_id` (`model_identity`: a
hash of the expert's tensor names, shapes and first bytes of every tensor), `calibration` (the
calibration file's SHA-256 and the row selection, identical for every slice of one run) and `shard`
(`"i/n"`, or null for a whole run). `mergeflow grams sum` refuses parts that differ in the first two
or repeat a shard; a merge refuses grams whose `model_id` is not their expert's (`check_grams_match`).
Errors name the exact command that fetches or recomputes a broken directory (`recompute_command`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Optional, Sequence

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..atomic import check_replaceable, full_disk_reported, umask, write_json
from ..blocks import in_repeated_block, layer_index
from ..model_files import open_safetensors

FORMAT = "mergeflow.grams/1"
FORMAT_2 = "mergeflow.grams/2"  # adds Conv1D's `transposed` and the `input_sum` of inputs to biased Linears
FORMATS = (FORMAT, FORMAT_2)
INDEX = "grams.json"
IDENTITY_BYTES = 4096  # sampled from the start of every tensor by `model_identity`


def dvc_stage_of(path: Path) -> Optional[tuple[str, Path]]:
    """(stage, repository root) when `dvc.lock` records `path` as a stage's output, else None."""
    target = Path(path).resolve()
    for root in target.parents:
        lock = root / "dvc.lock"
        if lock.is_file():
            try:
                stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
            except (OSError, yaml.YAMLError):
                return None
            for stage, info in stages.items():
                if any((root / out.get("path", "")).resolve() == target for out in (info or {}).get("outs", []) or []):
                    return stage, root
            return None
        if (root / "dvc.yaml").is_file() or (root / ".git").exists():
            return None
    return None


def _in_root(root: Path, command: str) -> str:
    return command if root == Path.cwd().resolve() else f"cd {shlex.quote(str(root))} && {command}"


def recompute_command(path: str | Path) -> str:
    """The exact command that recomputes the gram directory `path`: its DVC stage alone
    (`dvc repro -s -f gram@<expert>`, never the stages upstream of it) when `dvc.lock` records it,
    else the `mergeflow grams` command that grams.json says made it."""
    path = Path(path)
    found = dvc_stage_of(path)
    if found:
        stage, root = found
        return _in_root(root, f"dvc repro -s -f {stage}")
    try:
        meta = json.loads((path / INDEX).read_text())
    except (OSError, ValueError):
        meta = {}
    calibration = meta.get("calibration") or {}
    args = ["mergeflow", "grams", "--model", meta.get("model") or "<expert dir>", "--data", meta.get("data") or "<calibration file>", "--out", str(path)]
    for option, key in (("--text-field", "text_field"), ("--max-length", "max_length"), ("--num-samples", "num_samples"), ("--seed", "seed")):
        if calibration.get(key) is not None and (key, calibration[key]) != ("text_field", "text"):
            args += [option, str(calibration[key])]
    if meta.get("shard"):
        args += ["--shard", meta["shard"]]
    return "rm -rf " + shlex.quote(str(path)) + " && " + " ".join(shlex.quote(str(a)) if not a.startswith("<") else a for a in args)


def read_index(index: Path, what: str, advice: Callable[[], str]) -> Any:
    """The JSON index file of an output directory mergeflow wrote (`what` says which kind), or one
    line when it is missing or not JSON (`advice()`: how to replace it)."""
    if not index.is_file():
        raise FileNotFoundError(f"{index}: not found; is {index.parent} {what}?")
    try:
        return json.loads(index.read_text())
    except ValueError as err:
        raise ValueError(f"{index}: not valid JSON ({err}); {advice()}") from None


def recover_advice(path: str | Path, file: Optional[str | Path] = None) -> str:
    """How to replace a broken gram directory, with its real paths: under DVC, delete the corrupt
    object from the cache first (workspace files are links into it, and `dvc checkout`/`dvc pull
    --force` would link that same object again), then pull the stage's output or recompute it."""
    path = Path(path)
    found = dvc_stage_of(path)
    if not found:
        return f"recompute it: `{recompute_command(path)}`"
    stage, root = found
    rel = os.path.relpath(path.resolve(), root)
    purge = f'find "$(dvc cache dir)" -samefile "$(readlink -f {shlex.quote(os.path.relpath(Path(file).resolve(), root))})" -delete && ' if file else ""
    return (
        f"fetch it again: `{_in_root(root, f'{purge}rm -rf {shlex.quote(rel)} && dvc pull {stage}')}` "
        f"(or recompute it: `{recompute_command(path)}`)"
    )


@dataclass(frozen=True)
class GramRef:
    """Where a module's gram is stored; `transposed`: its weight is stored [in, out] (Conv1D);
    `input_sum`: the key of the `[in]` sum of its inputs (kept for Linears with a bias)."""

    file: str
    key: str
    transposed: bool = False
    input_sum: Optional[str] = None

    def record(self) -> dict:
        """Its entry in grams.json (version-1 fields only when nothing else is needed)."""
        return {"file": self.file, "key": self.key, **({"transposed": True} if self.transposed else {}), **({"input_sum": self.input_sum} if self.input_sum else {})}


def format_for(refs: Iterable[GramRef]) -> str:
    """The lowest format version that describes these records: 2 only for what 1 cannot say."""
    return FORMAT_2 if any(r.transposed or r.input_sum for r in refs) else FORMAT


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
    model_id: Optional[str] = None
    calibration: Optional[Mapping] = None
    shard: Optional[str] = None
    format: str = FORMAT
    output_layer: str = "lm_head"  # the checkpoint name of the output layer (GPT-NeoX: embed_out)

    @classmethod
    def open(cls, path: str | Path) -> "GramDir":
        path = Path(path)
        index = path / INDEX
        meta = read_index(index, "a gram directory written by `mergeflow grams`", lambda: recover_advice(path, index))
        if meta.get("format") not in FORMATS:
            raise ValueError(f"{index}: format {meta.get('format')!r} is not one of {', '.join(map(repr, FORMATS))}; a newer mergeflow wrote it: upgrade mergeflow")
        reduction = meta.get("reduction", "sum")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"{index}: reduction must be 'sum' or 'mean', got {reduction!r}")
        num_tokens = meta.get("num_tokens")
        if reduction == "sum" and (not isinstance(num_tokens, int) or num_tokens < 1):
            raise ValueError(f"{index}: num_tokens must be a positive integer for summed grams, got {num_tokens!r}")
        modules = {name: GramRef(ref["file"], ref["key"], bool(ref.get("transposed", False)), ref.get("input_sum")) for name, ref in meta.get("modules", {}).items()}
        if not modules:
            raise ValueError(f"{index}: lists no modules")
        files = meta.get("files") or {}
        for file in sorted({ref.file for ref in modules.values()}):
            if not (path / file).is_file():
                raise FileNotFoundError(f"{path / file}: listed in {index} but missing; {recover_advice(path)}")
            expected = files.get(file, {}).get("bytes")
            actual = (path / file).stat().st_size
            if expected is not None and expected != actual:
                raise ValueError(f"{path / file}: {actual} bytes, but {index} records {expected}; the file is truncated or corrupt: {recover_advice(path, path / file)}")
            with open_safetensors(path / file) as f:
                keys = set(f.keys())
            missing = sorted({k for ref in modules.values() if ref.file == file for k in (ref.key, ref.input_sum) if k} - keys)
            if missing:
                raise ValueError(f"{path / file}: lacks tensors {missing[:3]} that {index} points to; {recover_advice(path, index)}")
        return cls(path, num_tokens, str(meta.get("model", "")), modules, reduction, files, meta.get("model_id"), meta.get("calibration"), meta.get("shard"),
                   meta["format"], meta.get("output_layer", "lm_head"))

    def verify(self) -> list[str]:
        """Check every file's SHA-256 against `grams.json`; return the files checked."""
        checked = []
        for file, record in sorted(self.files.items()):
            if "sha256" in record and sha256_of(self.path / file) != record["sha256"]:
                raise ValueError(f"{self.path / file}: SHA-256 differs from the one in {self.path / INDEX}; the file is corrupt: {recover_advice(self.path, self.path / file)}")
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

    def load_mean_augmented(self, module: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
        """The per-token mean gram of `module`'s input augmented by a constant 1, `[in + 1, in + 1]`:
        `[[G, m], [m^T, 1]]` with `m` the mean input, for a least-squares fit with a bias. Needs the
        input sum, which grams of format 1 (or imported mean grams) do not hold: refused, saying so."""
        ref = self.modules[module]
        if ref.input_sum is None or self.reduction != "sum":
            if (self.calibration or {}).get("target_field") is not None and self.reduction == "sum":  # encoder-decoder grams of this mergeflow
                raise ValueError(f"{self.path / INDEX}: no input sum for {module}: an encoder-decoder's decoder Linears cannot have their bias solved yet "
                                 "(their token count differs from the encoder's); set merge.regmean_bias: average")
            why = "imported mean grams" if self.reduction != "sum" else f"format {self.format!r}, written before input sums were kept"
            raise ValueError(f"{self.path / INDEX}: no input sum for {module} ({why}); solving biases needs grams from this mergeflow: `{recompute_command(self.path)}`")
        n = self.load(module).shape[0]
        out = torch.empty(n + 1, n + 1, dtype=dtype, device=device)
        out[:n, :n] = self.load_mean(module, dtype, device)
        with open_safetensors(self.path / ref.file) as f:
            mean = f.get_tensor(ref.input_sum).to(device=device, dtype=dtype).div_(self.num_tokens)
        out[:n, n] = mean
        out[n, :n] = mean
        out[n, n] = 1.0
        return out


def by_file(keys: Iterable[str], file_of: Callable[[str], str]) -> dict[str, list[str]]:
    """`keys` grouped by the gram file each goes to (one file per block), in the order first seen."""
    files: dict[str, list[str]] = {}
    for key in keys:
        files.setdefault(file_of(key), []).append(key)
    return files


def file_for(module: str) -> str:
    """One safetensors file per transformer layer; anything outside the layers goes to `other`."""
    index = layer_index(module)
    return f"layer_{index:03d}.safetensors" if index is not None else "other.safetensors"


class GramWriter:
    """Writes a gram directory file by file (so a caller never holds every layer at once), then
    `grams.json` with each file's size and hash. Use inside `atomic_dir`."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.files: dict[str, dict] = {}
        self.modules: dict[str, dict] = {}

    def write_file(self, file: str, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32, version: str = FORMAT) -> None:
        if file in self.files:
            raise ValueError(f"{file} written twice")
        with disk_errors(self.out / file):
            save_tensors({k: v.to(dtype).contiguous() for k, v in tensors.items()}, self.out / file, version)
        self.add_file(file)

    def add_file(self, file: str, record: Optional[Mapping] = None) -> None:
        """Record a file already placed in the directory (readable as the umask allows, like
        grams.json); `record` ({bytes, sha256}) when its hash is already known."""
        os.chmod(self.out / file, 0o666 & ~umask())
        self.files[file] = dict(record) if record else file_record(self.out / file)

    def finish(self, refs: Mapping[str, GramRef], *, num_tokens: Optional[int], model: str, reduction: str = "sum", dtype: str = "float32", **extra) -> None:
        """`refs`: module -> where its gram is (its own key, or that of the module whose input it shares)."""
        with disk_errors(self.out / INDEX):
            write_json(
                self.out / INDEX,
                {
                    "format": format_for(refs.values()),
                    "reduction": reduction,
                    "num_tokens": int(num_tokens) if num_tokens is not None else None,
                    "model": model,
                    "dtype": dtype,
                    **extra,
                    "modules": {m: ref.record() for m, ref in sorted(refs.items())},
                    "files": dict(sorted(self.files.items())),
                },
            )


def file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_of(path)}


@contextlib.contextmanager
def disk_errors(path: str | Path) -> Iterator[None]:
    """A full disk while writing `path` as one line naming it and the fix (`atomic.full_disk_reported`),
    instead of safetensors' `SafetensorError: ... IoError(StorageFull)` or a bare `[Errno 28]`
    without a path; any other safetensors write error names the path too."""
    try:
        with full_disk_reported(lambda: f"{path}: no space left on the device; {disk_fix(path)}"):
            yield
    except SafetensorError as err:
        raise OSError(f"{path}: could not be written ({err})") from None


def disk_fix(path: str | Path) -> str:
    where = Path(path).parent
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    kept = "; layers already finished are kept and not computed again" if any(p.name.endswith(".partial") for p in Path(path).parents) else ""
    return f"{free / 1e9:.1f} GB free there: free space on that disk (or write the grams to another one) and rerun the same command{kept}"


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path, version: str = FORMAT) -> None:
    """safetensors' `save_file` with the format metadata (callers name the path in `disk_errors`)."""
    save_file(dict(tensors), str(path), metadata={"format": version})


def model_identity(model_dir: str | Path) -> Optional[str]:
    """A SHA-256 that tells experts apart without reading their weights: the name, dtype, shape and
    first `IDENTITY_BYTES` of every tensor in the transformer blocks (a numbered path component, as
`layers.N.`, `h.N.`, `block.N.`; fine-tuning
    changes almost every value of a tensor it trains), whatever the shard layout and whether a tied
    `lm_head` is stored or not. About 1 MB read for an 8B model; None for a model without
    safetensors files."""
    digest = hashlib.sha256()
    entries = []
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    for file in files:
        with open(file, "rb") as f:
            try:
                size = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(size))
            except (struct.error, ValueError) as err:
                raise ValueError(f"{file}: not a readable safetensors file ({err}); it may be truncated or corrupt") from None
            for name, info in header.items():
                if name == "__metadata__" or not in_repeated_block(name):
                    continue
                start, end = info["data_offsets"]
                f.seek(8 + size + start)
                entries.append((name, info["dtype"], info["shape"], f.read(min(IDENTITY_BYTES, end - start))))
    for name, dtype, shape, head in sorted(entries):
        digest.update(json.dumps([name, dtype, shape]).encode())
        digest.update(head)
    return digest.hexdigest()


def check_grams_match(grams: Sequence[GramDir], experts: Sequence[str | Path]) -> None:
    """Refuse gram directories that are not their expert's (given in another order than the experts,
    or computed for another model), by the `model_id` each grams.json records. Directories written
    before `model_id` existed are not checked."""
    if not any(g.model_id for g in grams):
        return
    ids = [model_identity(e) for e in experts]
    for g, expert, own in zip(grams, experts, ids):
        if g.model_id is None or own is None or g.model_id == own:
            continue
        if g.model_id in ids:
            other = experts[ids.index(g.model_id)]
            raise ValueError(f"{g.path}: holds the grams of {other}, but is given for {expert}; list the gram directories in the order of the experts (--gram after --gram as --model after --model)")
        raise ValueError(f"{g.path}: grams of another model ({g.model or 'unknown'}), not of {expert}; recompute them for this expert: `{recompute_command(g.path)}`")


def owned_files(out: Path) -> Optional[set[str]]:
    """The files a gram directory of mergeflow holds (grams.json and the files it lists), or None
    when `out` is not one."""
    try:
        meta = json.loads((out / INDEX).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") not in FORMATS:
        return None
    return {INDEX, *(meta.get("files") or {}), *(ref.get("file") for ref in (meta.get("modules") or {}).values() if isinstance(ref, dict))}


def check_gram_output(out: str | Path, *, force: bool, inputs: Iterable[str | Path]) -> None:
    """Refuse to write grams over anything but an earlier gram directory, and over that without
    `force`: never an input of the command, a plain file, a model or foreign files."""
    check_replaceable(out, force=force, inputs=inputs, owned_files=owned_files, what="gram", option="--out")
