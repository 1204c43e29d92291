"""Which modules RegMean solves, found from the module tree of any transformers model.

A transformer repeats one block: the model holds its blocks in a `ModuleList` of identical
modules, whatever it is called (`model.layers`, `transformer.h`, `gpt_neox.layers`,
`model.decoder.layers`, `encoder.block` and `decoder.block`...). Every `nn.Linear` (and subclass,
such as Falcon's) and every transformers `Conv1D` (GPT-2's projections, whose weight is stored
`[in, out]`) inside those blocks is solved; the output layer too when asked for. Every other
tensor (embeddings, norms, biases unless solved) is merged by the method's rule for tensors
without grams.

Names are the checkpoint's: transformers may rename tensors between the module tree and the
files (GPT-NeoX's `lm_head` is saved as `embed_out`), and the merge engine reads the files.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

log = logging.getLogger(__name__)
OTHER_FILE = "other.safetensors"  # gram file of what lies outside the blocks (the output layer)


# Module classes whose forward is `x @ W^T (+ b)` on their first argument, with the weight stored
# [out, in] (False) or [in, out] (True): RegMean solves them. `register_linear` adds one (a MoE
# router, a custom projection).
LINEAR_LIKE: dict[type, bool] = {nn.Linear: False}
try:
    from transformers.pytorch_utils import Conv1D

    LINEAR_LIKE[Conv1D] = True
except ImportError:  # pragma: no cover - transformers is a dependency; Conv1D moved one day
    pass


def register_linear(cls: type, *, transposed: bool = False) -> type:
    """Let RegMean solve modules of `cls`: a `weight` parameter ([out, in], or [in, out] with
    `transposed`), an optional `bias`, and a forward computing `x @ W^T (+ b)` on its first argument."""
    LINEAR_LIKE[cls] = transposed
    return cls


def solvable(module: nn.Module) -> bool:
    return isinstance(module, tuple(LINEAR_LIKE))


@dataclass(frozen=True)
class SolvedModule:
    """A Linear (or Conv1D) whose weight RegMean solves from the grams of its input."""

    name: str            # as the checkpoint names it: its weight is the tensor `<name>.weight`
    in_features: int
    out_features: int
    transposed: bool     # Conv1D: the weight is stored [in, out], not [out, in]
    bias: bool
    file: str            # the gram file of its block (one file per block)
    module: nn.Module = field(compare=False, repr=False)


@dataclass(frozen=True)
class ModuleMap:
    """The solved modules of a model in the order the model lists them, and its block containers."""

    containers: tuple[str, ...]
    solved: dict[str, SolvedModule]
    output_layer: Optional[str] = None  # the checkpoint name of the output layer, when solved

    def linears(self) -> dict[str, nn.Module]:
        """Checkpoint name -> module, to hook."""
        return {name: m.module for name, m in self.solved.items()}

    def file_of(self, name: str) -> str:
        return self.solved[name].file

    def averaged(self, tensor_names: list[str]) -> list[str]:
        """The checkpoint tensors merged without grams: all but the solved weights."""
        solved = {f"{name}.weight" for name in self.solved}
        return [t for t in tensor_names if t not in solved]


def block_containers(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The outermost `ModuleList`s of identical modules that hold a Linear: the repeated blocks."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():  # parents before children
        if not name or not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        first = module[0]
        if len({type(block) for block in module}) == 1 and not solvable(first) and any(solvable(m) for m in first.modules()):
            found.append((name, module))
    return found


def gram_file(container: str, index: int, several: bool) -> str:
    """One gram file per block: `layer_007.safetensors`, or `encoder_block_007.safetensors` when the
    model has several block containers (an encoder and a decoder)."""
    return f"{container.replace('.', '_')}_{index:03d}.safetensors" if several else f"layer_{index:03d}.safetensors"


def checkpoint_names(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Module name -> the name its weight has in the model's files (transformers' saving renames)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # an older transformers saves the module tree's names
        return {n: n for n in names}
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        renamed = list(revert_weight_conversion(model, {f"{name}.weight": modules[name].weight}))
        out[name] = renamed[0].removesuffix(".weight") if len(renamed) == 1 else name
    return out


def describe(module: nn.Module) -> tuple[int, int, bool, bool]:
    """(in_features, out_features, transposed, has bias) of a Linear-like module."""
    transposed = next(t for cls, t in LINEAR_LIKE.items() if isinstance(module, cls))
    n_out, n_in = module.weight.shape[::-1] if transposed else module.weight.shape
    return n_in, n_out, transposed, getattr(module, "bias", None) is not None


def discover(model: nn.Module, *, include_lm_head: bool = False, where: str = "the model") -> ModuleMap:
    """The modules RegMean solves in `model`; a model without any is refused, naming what it holds."""
    from .moe import expert_slots, register_routers

    register_routers(model)  # MoE routers (not nn.Linear in transformers 5) are solved like Linears
    containers = block_containers(model)
    several = len(containers) > 1
    found: dict[str, tuple[nn.Module, str]] = {}
    block_file: dict[int, str] = {}
    for container, blocks in containers:
        for index, block in enumerate(blocks):
            for sub, module in block.named_modules():
                block_file[id(module)] = gram_file(container, index, several)
                if solvable(module):
                    found[f"{container}.{index}.{sub}"] = (module, gram_file(container, index, several))
    if not found:
        kinds = Counter(type(m).__name__ for m in model.modules())
        listed = ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items()))
        raise ValueError(f"{where}: no nn.Linear or Conv1D inside repeated blocks (a ModuleList of identical layers); its module types: {listed}")
    output = None
    head = model.get_output_embeddings() if include_lm_head and hasattr(model, "get_output_embeddings") else None
    if head is not None and solvable(head):
        output = next(name for name, m in model.named_modules() if m is head)
        found[output] = (head, OTHER_FILE)
    renamed = checkpoint_names(model, list(found))
    solved = {}
    for name, (module, file) in found.items():
        n_in, n_out, transposed, bias = describe(module)
        solved[renamed[name]] = SolvedModule(renamed[name], n_in, n_out, transposed, bias, file, module)
    for name, slot in expert_slots(model)[0].items():  # fused MoE experts: one solved tensor per expert, as saved
        solved[name] = SolvedModule(name, slot.in_features, slot.out_features, False, False, block_file[id(slot.experts)], slot)
    return ModuleMap(tuple(c for c, _ in containers), solved, renamed[output] if output else None)


def auto_class(config):
    """The transformers auto class that builds a model of `config`: seq2seq for encoder-decoders."""
    import transformers

    return transformers.AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else transformers.AutoModelForCausalLM


def skeleton(config) -> nn.Module:
    """A model of `config` (a transformers config) on the meta device: its module tree and shapes,
    no weights and no memory, whatever its size."""
    with torch.device("meta"):
        return auto_class(config).from_config(config)


def discover_dir(model_dir, *, include_lm_head: bool = False) -> tuple[ModuleMap, list[str]]:
    """The solved modules of the model directory `model_dir` from its config.json alone, and its
    tensor names (from the safetensors headers, or the module tree when it has no weights)."""
    from transformers import AutoConfig

    from ..model_files import CheckpointReader, require_model_dir

    model_dir = require_model_dir(model_dir)
    model = skeleton(AutoConfig.from_pretrained(model_dir))
    modules = discover(model, include_lm_head=include_lm_head, where=str(model_dir))
    try:
        names = CheckpointReader(model_dir).names()
    except FileNotFoundError:
        names = list(model.state_dict())
    return modules, names


def listing(modules: ModuleMap, tensor_names: list[str]) -> str:
    """What `mergeflow grams --list-modules` prints: solved modules, then averaged tensors."""
    lines = [f"block containers: {', '.join(modules.containers)}", f"solved by RegMean ({len(modules.solved)} modules, grams of their inputs):"]
    for m in modules.solved.values():
        kind = "Conv1D [in, out]" if m.transposed else "Linear"
        lines.append(f"  {m.name}  {kind} {m.in_features} -> {m.out_features}{' +bias' if m.bias else ''}")
    averaged = modules.averaged(tensor_names)
    lines.append(f"merged by the method's rule for tensors without grams ({len(averaged)} tensors):")
    lines += [f"  {t}" for t in averaged]
    return "\n".join(lines)
