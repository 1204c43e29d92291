"""Mixture-of-experts blocks as transformers 5 writes them (Mixtral, Qwen2-MoE, Qwen3-MoE, ...).

The router (`mlp.gate`, a `...TopKRouter`) is a module with a `[experts, hidden]` weight applied
with `F.linear`, not an `nn.Linear`: it gets a gram of its input and RegMean solves it like any
Linear. The experts' feed-forwards are fused 3-D parameters in memory (`mlp.experts.gate_up_proj`
`[experts, 2 x intermediate, hidden]`, `mlp.experts.down_proj`), which transformers splits back
into one tensor per expert when it saves (Mixtral: `block_sparse_moe.experts.<e>.w1/w2/w3`). They
get no grams: every merge method averages them as it averages any non-Linear tensor, and
`fused_expert_warning` names them. Shared experts (Qwen2-MoE's `shared_expert`,
`shared_expert_gate`) are ordinary Linears.

Grams are named as the tensors are on disk (the merge reads the files, not the model), so the
names of the model in memory go through transformers' own reverse conversion (`disk_names`).
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

log = logging.getLogger(__name__)


def disk_names(model: nn.Module, params: list[str]) -> dict[str, list[str]]:
    """Parameter name in memory -> the names of the tensors transformers saves it as (itself when
    the model type has no conversion): learnt by reverting tagged stand-ins (one column wide,
    every slice of a 3-D parameter tagged with its index) through `revert_weight_conversion`."""
    if not params:
        return {}
    shapes = dict(model.named_parameters())
    tagged = {}
    for i, name in enumerate(params):
        shape = shapes[name].shape
        tag = torch.full((*shape[:-1], 1), float(i * 10**6), dtype=torch.float64)
        if len(shape) == 3:
            tag += torch.arange(1, shape[0] + 1, dtype=torch.float64).view(-1, 1, 1)
        tagged[name] = tag
    try:
        from transformers.core_model_loading import revert_weight_conversion

        saved = revert_weight_conversion(model, tagged)
    except Exception as err:  # a transformers without (or with another) conversion API: names as in memory
        log.debug("no reverse weight conversion (%s: %s); tensor names as in memory", type(err).__name__, err)
        return {name: [name] for name in params}
    found: dict[str, list[str]] = {name: [] for name in params}
    for disk, tensor in saved.items():
        found[params[int(tensor.reshape(-1)[0].item()) // 10**6]].append(disk)
    return {name: sorted(names) or [name] for name, names in found.items()}


def routers(model: nn.Module) -> dict[str, nn.Module]:
    """MoE routers that are not `nn.Linear` (modules named `...Router` holding a 2-D `weight`),
    by the module name their weight is saved under (Mixtral: `block_sparse_moe.gate`)."""
    found = {
        name: m for name, m in model.named_modules()
        if type(m).__name__.endswith("Router") and isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() == 2
    }
    saved = disk_names(model, [f"{name}.weight" for name in found])
    return {saved[f"{name}.weight"][0].removesuffix(".weight"): m for name, m in found.items()}


def fused_experts(model: nn.Module) -> dict[str, list[str]]:
    """Parameters holding every expert's weight in one 3-D tensor -> the tensors saved for them."""
    fused = sorted(f"{name}.{p}" if name else p for name, m in model.named_modules() for p, t in m.named_parameters(recurse=False) if t.dim() == 3)
    return disk_names(model, fused)


def input_width(module: nn.Module) -> int:
    """The input size of a Linear (`in_features`) or of a router (its weight's last dimension)."""
    width = getattr(module, "in_features", None)
    return int(width) if width is not None else int(module.weight.shape[-1])


def fused_expert_warning(fused: dict[str, list[str]]) -> str:
    """One line naming the fused expert tensors (layer numbers folded: `model.layers.{0,1}.mlp.experts.down_proj`)
    and how they are saved."""
    patterns: dict[str, list[str]] = {}
    for name in fused:
        match = re.search(r"\.(\d+)\.", name)
        key = name[: match.start(1)] + "{}" + name[match.end(1):] if match else name
        patterns.setdefault(key, []).append(match.group(1) if match else "")
    shown = ", ".join(k.replace("{}", "{" + ",".join(v) + "}") if "{}" in k else k for k, v in patterns.items())
    saved = sorted(n for names in fused.values() for n in names)
    return (f"fused mixture-of-experts weights get no grams and are averaged by every method (RegMean solves the routers): {shown} "
            f"(saved as {len(saved)} tensors: {saved[0]}, ...)")
