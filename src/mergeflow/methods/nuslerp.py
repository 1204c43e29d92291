"""NuSLERP: mergekit's SLERP of two experts by their weights, optionally of their task vectors.

mergekit's `nuslerp` (https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md),
spherical interpolation after Shoemake 1985 (https://doi.org/10.1145/325334.325242).

With weights w_0, w_1 (mergekit's `weight`), t = w_1 / (w_0 + w_1) (0.5 where the sum is ~0).
With `nuslerp_flatten` (the default) each tensor is one vector; otherwise each row
(`nuslerp_row_wise: false`, along the last dimension) or each column (`nuslerp_row_wise: true`,
along dimension 0) is interpolated on its own sphere. Angles of the whole tensor or of columns
come from float64 sums over the row blocks (a first pass), rows need none: the engine streams
every case in row blocks. With a base model (`use_base`) the task
vectors `W_i - base` are interpolated and added back to the base, as mergekit does when a
`base_model` is given.

mergekit mapping: `weight` -> `weights` (per expert), `nuslerp_flatten`, `nuslerp_row_wise` as
named; `base_model` given -> `use_base: true`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch

from . import register
from .base import WEIGHTS, GramLoader, MergeMethod, Param
from .sparsify import serial_reductions
from .streaming import Statistics, dot64, gather

EPS = 1e-8


def _normalize(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=eps)


class Angles(Statistics):
    """cos of the angle between the two experts' vectors (their task vectors with a base), over the
    whole tensor (`columns` False) or per column (along dimension 0), from float64 sums."""

    def __init__(self, columns: bool):
        self.columns = columns
        self.sums: Optional[torch.Tensor] = None  # [<a, a>, <b, b>, <a, b>]

    def observe(self, step: int, tensors: Sequence[torch.Tensor], base: Optional[torch.Tensor]) -> None:
        a, b = task_vectors(tensors, base)
        if self.columns:
            with serial_reductions():
                sums = torch.stack([(x * y).sum(dim=0, dtype=torch.float64) for x, y in ((a, a), (b, b), (a, b))])
        else:
            sums = torch.tensor([dot64(a, a), dot64(b, b), dot64(a, b)], dtype=torch.float64)
        self.sums = sums if self.sums is None else self.sums + sums

    def cosine(self, eps: float = 1e-7) -> torch.Tensor:
        aa, bb, ab = self.sums
        return (ab / (aa.sqrt().clamp(min=eps) * bb.sqrt().clamp(min=eps))).to(torch.float32).clamp(-1, 1)


def task_vectors(tensors: Sequence[torch.Tensor], base: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The two experts in float32, minus the base when one is given."""
    a, b = (x.to(torch.float32) for x in tensors)
    if base is None:
        return a, b
    base32 = base.to(torch.float32)
    return a - base32, b - base32


def interpolate(t: float, cos_theta: torch.Tensor, v0: torch.Tensor, v1: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Spherical interpolation at angle(s) `cos_theta` (broadcast over `v0`, `v1`); linear where colinear."""
    colinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    return torch.where(colinear, (1 - t) * v0 + t * v1, result)


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool = False, flatten: bool = True, eps: float = EPS,
            angles: Optional[Angles] = None) -> torch.Tensor:
    """Spherical interpolation of `v0` (t = 0) and `v1` (t = 1) along the chosen dimension: the whole
    tensor or each column (`angles`, gathered here when not given), or each row (last dimension)."""
    if flatten or row_wise:
        angles = angles or gather(Angles(columns=not flatten), [v0, v1], None)
        return interpolate(t, angles.cosine(), v0, v1, eps)
    with serial_reductions():
        cos_theta = torch.sum(_normalize(v0) * _normalize(v1), dim=-1, keepdim=True).clamp(-1, 1)
    return interpolate(t, cos_theta, v0, v1, eps)


def interpolation_t(weights: list[float]) -> float:
    """mergekit's t from the two experts' weights."""
    total = sum(weights)
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


ROW_WISE = Param("nuslerp_row_wise", bool, False, "without nuslerp_flatten: interpolate each column (dimension 0) instead of each row", per_layer=False)
FLATTEN = Param("nuslerp_flatten", bool, True, "interpolate each tensor as one vector", per_layer=False)
USE_BASE = Param("use_base", bool, False, "interpolate the task vectors W_i - base and add them to the base", per_layer=False)


@register
class NuSlerp(MergeMethod):
    name = "nuslerp"
    paper = "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md"
    params = (WEIGHTS, ROW_WISE, FLATTEN, USE_BASE)
    row_separable = False

    def __init__(self, values: Optional[Mapping[str, Any]] = None):
        super().__init__(values)
        self.uses_base = bool(self.value("use_base", ""))  # this instance reads the base only when asked to

    def prepare(self, tensor_names: Sequence[str], *, num_experts: Optional[int] = None, device: str = "cpu") -> None:
        super().prepare(tensor_names, num_experts=num_experts, device=device)
        if num_experts is not None and num_experts != 2:
            raise ValueError(f"nuslerp interpolates exactly two experts, got {num_experts}; for more use karcher (their spherical mean) or another method")

    def block_copies(self, inputs: int) -> int:
        return inputs + 7  # the task vectors, both terms, their sum and quotient, the linear fallback

    def statistics(self, name: str, shape: tuple[int, ...]) -> Optional[Angles]:
        """The angle of the whole tensor or of each column; rows (the last dimension) need none."""
        flatten = self.value("nuslerp_flatten", name)
        return Angles(columns=not flatten) if flatten or self.value("nuslerp_row_wise", name) else None

    def merge(self, name: str, tensors: Sequence[torch.Tensor], *, grams: Optional[Sequence[GramLoader]] = None, base: Optional[torch.Tensor] = None,
              stats: Optional[Angles] = None) -> torch.Tensor:
        t = interpolation_t(self.expert_weights(name, len(tensors), normalise=False))
        flags = dict(row_wise=self.value("nuslerp_row_wise", name), flatten=self.value("nuslerp_flatten", name))
        base = base if self.uses_base else None
        a, b = task_vectors(tensors, base)
        merged = nuslerp(t, a, b, **flags, angles=stats)
        return merged if base is None else base.to(torch.float32) + merged
