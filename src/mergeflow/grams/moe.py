"""Mixture-of-experts blocks as transformers 5 writes them (Mixtral, Qwen2-MoE, Qwen3-MoE, ...).

The router (`mlp.gate`, a `...TopKRouter`) is a module with a `[experts, hidden]` weight applied
with `F.linear`, not an `nn.Linear`: it gets a gram of its input and RegMean solves it like any
Linear. The experts' feed-forwards are fused 3-D parameters in memory (`mlp.experts.gate_up_proj`
`[experts, 2 x intermediate, hidden]`, `mlp.experts.down_proj` `[experts, hidden, intermediate]`),
which transformers splits back into one tensor per expert when it saves (Mixtral:
`block_sparse_moe.experts.<e>.w1/w3/w2`, Qwen2-MoE: `mlp.experts.<e>.gate_proj/up_proj/down_proj`).
Each saved expert tensor is solved like a Linear, with a gram over the tokens routed to that
expert: gate and up see the routed hidden states, down sees `act(gate) * up` of those tokens
(recomputed from the weights, as the eager forward computes it). Every token counts once in
`num_tokens`, so an expert's gram weighs in with the share of tokens it received. Fused experts of
another layout (transposed, with biases, without a gate) get no grams and are averaged by every
method, with a warning naming them (`fused_expert_warning`). Shared experts (Qwen2-MoE's
`shared_expert`, `shared_expert_gate`) are ordinary Linears.

Grams are named as the tensors are on disk (the merge reads the files, not the model), so the
names of the model in memory go through transformers' own reverse conversion (`saved_as`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def saved_as(model: nn.Module, params: list[str]) -> dict[str, list[tuple[str, int]]]:
    """Parameter name in memory -> `(saved tensor name, index along the first dimension)` of
    each tensor transformers saves it as (itself, index -1, when the model type has no conversion
    or the parameter is 2-D): learnt by reverting tagged stand-ins (one column wide, every slice of
    a 3-D parameter tagged with its index) through `revert_weight_conversion`."""
    if not params:
        return {}
    try:  # under `mergeflow plan`'s fake tensors: the tags must hold real values
        from torch._subclasses.fake_tensor import unset_fake_temporarily
    except ImportError:  # pragma: no cover - an older torch
        import contextlib

        unset_fake_temporarily = contextlib.nullcontext
    with unset_fake_temporarily():
        return _saved_as(model, params)


def _saved_as(model: nn.Module, params: list[str]) -> dict[str, list[tuple[str, int]]]:
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
        return {name: [(name, -1)] for name in params}
    found: dict[str, list[tuple[str, int]]] = {name: [] for name in params}
    for disk, tensor in saved.items():
        values = tensor.reshape(-1)
        tag = int(values[0].item())
        index = tag % 10**6 - 1 if bool((values == values[0]).all()) else -2  # -2: mixes slices (not one expert's)
        found[params[tag // 10**6]].append((disk, index))
    return {name: sorted(pairs) or [(name, -1)] for name, pairs in found.items()}


def disk_names(model: nn.Module, params: list[str]) -> dict[str, list[str]]:
    """Parameter name in memory -> the names of the tensors transformers saves it as."""
    return {name: [disk for disk, _ in pairs] for name, pairs in saved_as(model, params).items()}


def register_routers(model: nn.Module) -> None:
    """Let discovery solve the MoE routers of `model` that are not `nn.Linear`: modules named
    `...Router` holding a 2-D `[experts, hidden]` weight, applied with `F.linear` to their input."""
    from .modules import register_linear

    for m in model.modules():
        if type(m).__name__.endswith("Router") and isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() == 2:
            register_linear(type(m))


def fused_experts(model: nn.Module) -> dict[str, list[str]]:
    """Parameters holding every expert's weight in one 3-D tensor -> the tensors saved for them."""
    fused = sorted(f"{name}.{p}" if name else p for name, m in model.named_modules() for p, t in m.named_parameters(recurse=False) if t.dim() == 3)
    return disk_names(model, fused)


@dataclass(eq=False)
class ExpertSlot:
    """One saved expert tensor of a fused experts module, as a gram target: expert `index`'s
    gate or up projection (`kind` "in": the routed hidden states) or its down projection ("mid")."""

    experts: nn.Module
    index: int
    kind: str
    in_features: int
    out_features: int


def supported_layout(experts: nn.Module) -> bool:
    """transformers' default experts layout: `gate_up_proj` `[E, 2I, H]` (gate first), `down_proj`
    `[E, H, I]`, an `act_fn`, no biases, not transposed: what `expert_inputs` recomputes."""
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == down.dim() == 3 and hasattr(experts, "act_fn")):
        return False
    flags = {f: getattr(experts, f, d) for f, d in (("has_gate", True), ("has_bias", False), ("is_transposed", False), ("is_concatenated", True), ("has_post_expert_norm", False))}
    if flags != {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True, "has_post_expert_norm": False}:
        return False
    e, two_i, h = gate_up.shape
    return two_i % 2 == 0 and tuple(down.shape) == (e, h, two_i // 2) and sum(1 for _ in experts.parameters(recurse=False)) == 2


def expert_slots(model: nn.Module) -> tuple[dict[str, ExpertSlot], dict[str, list[str]]]:
    """The gram targets of the fused experts, by saved module name, and the fused parameters
    left without grams (another layout, or saved in a way that mixes experts) -> their saved tensors."""
    slots: dict[str, ExpertSlot] = {}
    params = {}
    for name, m in model.named_modules():
        if supported_layout(m):
            params[f"{name}.gate_up_proj"] = (m, "in", m.gate_up_proj.shape[-1], m.gate_up_proj.shape[1] // 2)
            params[f"{name}.down_proj"] = (m, "mid", m.down_proj.shape[-1], m.down_proj.shape[1])
    saved = saved_as(model, sorted(params))
    for param, (module, kind, width, out) in params.items():
        targets = saved[param]
        if any(index < 0 or not disk.endswith(".weight") for disk, index in targets):
            continue
        for disk, index in targets:
            slots[disk.removesuffix(".weight")] = ExpertSlot(module, index, kind, int(width), int(out))
    covered = {id(slot.experts) for slot in slots.values()}
    unsolved = {name: names for name, names in fused_experts(model).items() if id(model.get_submodule(name.rsplit(".", 1)[0])) not in covered}
    return slots, unsolved


def slot_blocks(linears: dict[str, nn.Module]) -> list[tuple[nn.Module, dict[str, ExpertSlot]]]:
    """The expert slots among `linears`, grouped by their fused experts module (hooked once), sorted by name."""
    blocks: dict[int, tuple[nn.Module, dict[str, ExpertSlot]]] = {}
    for name in sorted(linears):
        slot = linears[name]
        if isinstance(slot, ExpertSlot):
            blocks.setdefault(id(slot.experts), (slot.experts, {}))[1][name] = slot
    return list(blocks.values())


def expert_inputs(experts: nn.Module, hidden: torch.Tensor, routed_to: torch.Tensor, mask, wanted: set[tuple[int, str]]):
    """`((expert, kind), rows)` for each wanted slot: "in", the hidden states of the (non-padding)
    tokens routed to the expert; "mid", `act(gate) * up` of them, computed as the forward does."""
    x = hidden.reshape(-1, hidden.shape[-1])
    routed_to = routed_to.reshape(x.shape[0], -1)
    half = experts.gate_up_proj.shape[1] // 2
    for index in sorted({i for i, _ in wanted}):
        rows = (routed_to == index).any(-1)
        if mask is not None:
            rows &= mask
        tokens = x[rows]
        if (index, "in") in wanted:
            yield (index, "in"), tokens
        if (index, "mid") in wanted:
            gate_up = experts.gate_up_proj[index]
            yield (index, "mid"), experts.act_fn(F.linear(tokens, gate_up[:half])) * F.linear(tokens, gate_up[half:])


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
