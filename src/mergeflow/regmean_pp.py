"""The RegMean++ engine: merge layer by layer, each layer's grams taken on inputs that the already
merged layers produced (Nguyen et al. 2025, https://arxiv.org/abs/2508.03121).

RegMean solves each Linear from grams of the experts' own activations, so the merged model's layer
l is fitted to inputs that its merged layers < l no longer produce. RegMean++ follows the merged
model instead, as FusionBench's reference does:

1. the embeddings (and every tensor outside the transformer blocks) are weighted-averaged;
2. each expert's calibration rows pass through the merged embeddings: the inputs of layer 0;
3. for each layer l: each expert's own layer l runs on that expert's current hidden states, with
   hooks summing `x x^T` of every Linear's non-padding inputs (inside the layer, a Linear sees the
   expert's own earlier sub-layers, e.g. o_proj the expert's attention); RegMean's solve
   (`methods.regmean`) merges the Linears, the other tensors of the layer are averaged; then every
   expert's hidden states pass through the merged layer l, becoming the inputs of layer l + 1.

So the merge stage needs the experts' calibration data and runs forward passes: grams cannot be
computed once and cached as for RegMean, which is why with `method: regmean_pp` every change of
`alpha` (or `merge.weights`) reruns these forwards, each about the cost of computing grams.

Memory: one model (the skeleton the merged layers are written into, in `model_dtype`), one layer
of grams per expert, and the hidden states of every (expert, batch), kept in memory up to
`max_hidden_memory` bytes and in safetensors files in a hidden temporary beside the output beyond
that (removed at the end). Merged tensors are written as each layer is done (`ShardedWriter`).
Decoder layers must share one attention mask (no per-layer sliding windows); lm_head is averaged.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .atomic import atomic_dir, check_replaceable, full_disk_reported, remove_path, temporary_name, write_json
from .model_files import CheckpointReader, ShardedWriter, copy_model_files, torch_dtype
from .grams.accumulate import StopForward, add_gram, symmetric
from .grams.batches import pad_batch
from .grams.collect import length_sorted_batches
from .grams.data import load_rows, tokenize
from .finite import check_finite
from .merge import (MERGE_CONFIG, check_disk_space, check_magnitude, check_same_config, check_same_tensors, disk_full_message,
                    merged_files, model_card)
from .models import load_model
from .params import GramParams

log = logging.getLogger(__name__)
HIDDEN_MEMORY = 2 * 2**30  # hidden states kept in memory before they go to disk
_LAYER = re.compile(r"^(.*?layers)\.(\d+)\.")
_GRAM_DEFAULTS = GramParams()  # the calibration defaults: params.yaml's `gram` group, one place


@dataclass(frozen=True)
class Calibration:
    """Each expert's calibration file, and how rows are chosen and forwarded (as for grams: the
    defaults are `GramParams`', params.yaml's `gram` group)."""

    files: tuple[Path, ...]
    text_field: str = _GRAM_DEFAULTS.text_field
    max_length: int = _GRAM_DEFAULTS.max_length
    num_samples: Optional[int] = _GRAM_DEFAULTS.num_samples
    seed: Optional[int] = _GRAM_DEFAULTS.seed
    batch_size: int = _GRAM_DEFAULTS.batch_size
    model_dtype: str = _GRAM_DEFAULTS.model_dtype


class HiddenStore:
    """Hidden states by (expert, batch): in memory up to `budget` bytes, then in files under `root`."""

    def __init__(self, root: Path, budget: int, device: str):
        self.root, self.budget, self.device = root, budget, device
        self.memory: dict[tuple[int, int], torch.Tensor] = {}
        self.used = 0
        self.on_disk = 0

    def put(self, key: tuple[int, int], tensor: torch.Tensor) -> None:
        old = self.memory.pop(key, None)
        self.used -= old.nbytes if old is not None else 0
        if self.used + tensor.nbytes <= self.budget:
            self.memory[key] = tensor
            self.used += tensor.nbytes
            return
        self.root.mkdir(exist_ok=True)
        save_file({"h": tensor.detach().cpu().contiguous()}, str(self.root / f"{key[0]}-{key[1]}.safetensors"))
        self.on_disk += 1

    def get(self, key: tuple[int, int]) -> torch.Tensor:
        if key in self.memory:
            return self.memory[key]
        return load_file(self.root / f"{key[0]}-{key[1]}.safetensors")["h"].to(self.device)


class LayerGrams:
    """Forward pre-hooks on one layer's Linears summing `x x^T` over the non-padding tokens; Linears
    fed the same tensor (q/k/v, gate/up) share one sum (`keys`)."""

    def __init__(self, linears: dict[str, nn.Linear], dtype: torch.dtype):
        self.dtype = dtype
        self.sums: dict[str, torch.Tensor] = {}
        self.keys: dict[str, str] = {}
        self.num_tokens = 0
        self.mask: Optional[torch.Tensor] = None
        self._last: tuple[Optional[torch.Tensor], str] = (None, "")
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if self._last[0] is not x:
                self._last = (x, name)
            owner = self.keys.setdefault(name, self._last[1])
            if owner != name:
                return
            rows = x.reshape(-1, x.shape[-1])[self.mask].to(self.dtype)
            if name not in self.sums:
                self.sums[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=self.dtype, device=x.device)
            add_gram(self.sums[name], rows)

        return hook

    def run(self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict, mask: torch.Tensor) -> None:
        self.mask = mask.reshape(-1).bool()
        try:
            layer(hidden, **kwargs)
        finally:
            self._last = (None, "")
        self.num_tokens += int(self.mask.sum())

    def mean(self, module: str, dtype: torch.dtype, device: str) -> "MemoryGram":
        key = self.keys[module]
        return MemoryGram((id(self), key), symmetric(self.sums[key]), self.num_tokens, dtype, device)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass(frozen=True)
class MemoryGram:
    """A gram loader as RegMean's solve takes them: a new per-token mean gram on every call; `key`
    lets it factor a gram shared by q/k/v once."""

    key: tuple
    total: torch.Tensor
    num_tokens: int
    dtype: torch.dtype
    device: str

    def __call__(self) -> torch.Tensor:
        return self.total.to(device=self.device, dtype=self.dtype, copy=True).div_(self.num_tokens)


def decoder_layers(model: nn.Module, names: Sequence[str]) -> tuple[str, nn.ModuleList]:
    """The prefix (`model.layers`) and ModuleList of the transformer blocks."""
    prefixes = {m.group(1) for n in names if (m := _LAYER.match(n))}
    if len(prefixes) != 1:
        raise ValueError(f"regmean_pp: expected one stack of transformer blocks (`...layers.N.`), found {sorted(prefixes) or 'none'}")
    prefix = prefixes.pop()
    types = getattr(model.config, "layer_types", None)
    if types and len(set(types)) > 1:
        raise ValueError(f"regmean_pp: the model's layers mix attention types {sorted(set(types))}; RegMean++ here needs layers that share one attention mask")
    return prefix, model.get_submodule(prefix)


def layer_inputs(model: nn.Module, first: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The hidden states and keyword arguments (masks, positions, rotary embeddings) with which
    `model` calls its first block on this batch; the rest of the forward is skipped."""
    seen: dict = {}

    def hook(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), use_cache=False)
    except StopForward:
        pass
    finally:
        handle.remove()
    return seen["hidden"], seen["kwargs"]


def layer_output(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def expert_batches(tokenizer, file: Path, cal: Calibration, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One expert's calibration rows as the grams take them, in padded batches of similar length."""
    rows = tokenize(load_rows(file, cal.text_field, num_samples=cal.num_samples, seed=cal.seed), tokenizer, cal.max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    side = getattr(tokenizer, "padding_side", "right") or "right"
    batches = length_sorted_batches([len(r) for r in rows], cal.batch_size)
    return [tuple(t.to(device) for t in pad_batch([rows[i] for i in b], pad, side)) for b in batches]


class Run:
    """The state of one RegMean++ merge: the skeleton model, the experts, their batches and hidden states."""

    def __init__(self, model: nn.Module, readers: list[CheckpointReader], batches: list, store: HiddenStore, method, device: str):
        self.model, self.readers, self.batches, self.store, self.method, self.device = model, readers, batches, store, method, device
        self.prefix, self.layers = decoder_layers(model, readers[0].names())
        self.params = dict(model.named_parameters())
        self.gram_dtype = torch.float64 if method.solver_dtype == torch.float64 else torch.float32
        self.num_tokens = [0] * len(readers)

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write `tensors` into the skeleton (those that are its parameters)."""
        for name, t in tensors.items():
            if name in self.params:
                self.params[name].copy_(t.to(self.params[name].dtype))

    def kwargs(self, ids: torch.Tensor, mask: torch.Tensor) -> dict:
        return layer_inputs(self.model, self.layers[0], ids, mask)[1]

    def start(self) -> None:
        """Each expert's inputs to layer 0, through the (merged) embeddings."""
        for i, batches in enumerate(self.batches):
            for b, (ids, mask) in enumerate(batches):
                self.store.put((i, b), layer_inputs(self.model, self.layers[0], ids, mask)[0])

    def grams(self, index: int, names: Sequence[str]) -> list[LayerGrams]:
        """Per expert: its own layer `index` run on its current hidden states, grams of every Linear."""
        layer = self.layers[index]
        linears = {f"{self.prefix}.{index}.{n}": m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        out = []
        for i, reader in enumerate(self.readers):
            self.load({n: check_finite(reader.get(n), f"{reader.path}: {n}") for n in names})
            grams = LayerGrams(linears, self.gram_dtype)
            try:
                for b, (ids, mask) in enumerate(self.batches[i]):
                    grams.run(layer, self.store.get((i, b)), self.kwargs(ids, mask), mask)
            finally:
                grams.close()
            self.num_tokens[i] = grams.num_tokens
            out.append(grams)
        return out

    def merge(self, names: Sequence[str], grams: Optional[list[LayerGrams]] = None) -> dict[str, torch.Tensor]:
        """RegMean's solve for the Linears with grams, the weighted average for every other tensor;
        Linears sharing one gram next to each other, so that it is factored once."""
        keys = grams[0].keys if grams else {}
        order = sorted(names, key=lambda n: (keys.get(n.removesuffix(".weight"), n), n))
        merged = {}
        for name in order:
            tensors = [check_finite(r.get(name), f"{r.path}: {name}") for r in self.readers]
            module = name.removesuffix(".weight")
            loaders = None
            if grams and name.endswith(".weight") and module in keys:
                loaders = [g.mean(module, self.method.solver_dtype, self.method.device) for g in grams]
            merged[name] = check_finite(self.method.solve(name, tensors, loaders), f"merged tensor {name}")
        return merged

    def advance(self, index: int) -> None:
        """Every expert's hidden states through the merged layer `index`."""
        for i, batches in enumerate(self.batches):
            for b, (ids, mask) in enumerate(batches):
                self.store.put((i, b), layer_output(self.layers[index], self.store.get((i, b)), self.kwargs(ids, mask)))


def split_by_layer(names: Sequence[str]) -> tuple[list[str], dict[int, list[str]]]:
    """Tensors outside the transformer blocks, and each block's tensors (sorted)."""
    outside, layers = [], {}
    for name in names:
        m = _LAYER.match(name)
        if m:
            layers.setdefault(int(m.group(2)), []).append(name)
        else:
            outside.append(name)
    return sorted(outside), {i: sorted(v) for i, v in sorted(layers.items())}


@torch.no_grad()
def merge_regmean_pp(
    experts: Sequence[str | Path], method, out: str | Path, *, calibration: Calibration, device: str = "cpu",
    max_shard_size: int = 5 * 2**30, max_hidden_memory: int = HIDDEN_MEMORY, overwrite: bool = True, check_magnitudes: bool = True,
) -> dict:
    """Merge `experts` with RegMean++ (`method`: a `regmean_pp` instance) into `out`; return the saved config."""
    out, experts = Path(out), [Path(e) for e in experts]
    check_replaceable(out, force=overwrite, inputs=[*experts, *calibration.files], owned_files=merged_files, what="merged model")
    if not experts or len(calibration.files) != len(experts):
        raise ValueError(f"regmean_pp needs one calibration file per expert: {len(experts)} experts, {len(calibration.files)} files (--calib)")
    readers = [CheckpointReader(e) for e in experts]
    for other in readers[1:]:
        check_same_tensors(readers[0], other, "experts")
        check_same_config(readers[0].path, other.path, "experts")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    method.prepare(readers[0].names(), num_experts=len(experts), device=device)
    model, tokenizer = load_model(experts[0], device=device, dtype=torch_dtype(calibration.model_dtype))
    outside, layers = split_by_layer(readers[0].names())
    specs = [readers[0].specs[n] for n in [*outside, *(n for names in layers.values() for n in names)]]
    needed = sum(s.nbytes for s in specs)
    check_disk_space(out, needed)
    batches = [expert_batches(tokenizer, f, calibration, device) for f in calibration.files]
    hidden = temporary_name(out, "-hidden")
    with full_disk_reported(lambda: disk_full_message(out, needed)), atomic_dir(out) as tmp:
        try:
            run = Run(model, readers, batches, HiddenStore(hidden, max_hidden_memory, device), method, device)
            writer = ShardedWriter(tmp, specs, max_shard_size)
            write = _writer(writer, readers, method.name, check_magnitudes)
            merged = run.merge(outside)
            run.load(merged)
            run.start()
            write(outside, merged)
            for index, names in tqdm(layers.items(), desc="merge (regmean_pp)", unit="layer"):
                merged = run.merge(names, run.grams(index, names))
                run.load(merged)
                write(names, merged)
                if index + 1 < len(layers):
                    run.advance(index)
            writer.close()
        finally:
            remove_path(hidden)
        copy_model_files(experts[0], tmp)
        config = {**method.config(), "experts": [str(e) for e in experts], "calibration": [str(f) for f in calibration.files],
                  "num_tokens": run.num_tokens, **method.report()}
        (tmp / "README.md").write_text(model_card(config))
        config["files"] = sorted({p.name for p in tmp.iterdir()} | {MERGE_CONFIG})
        write_json(tmp / MERGE_CONFIG, config)
    log.info("merged %d layers of %d experts with regmean_pp -> %s", len(layers), len(experts), out)
    return config


def _writer(writer: ShardedWriter, readers: Sequence[CheckpointReader], method: str, check_magnitudes: bool):
    def write(names: Sequence[str], merged: dict[str, torch.Tensor]) -> None:
        for name in names:
            if check_magnitudes:
                check_magnitude(merged[name], name, [(r.path, r.get(name)) for r in readers], method)
            writer.write(name, merged[name].to(readers[0].specs[name].dtype))

    return write
