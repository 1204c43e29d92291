"""SLERP: spherical linear interpolation between two experts (Shoemake, SIGGRAPH 1985).

Shoemake, "Animating rotation with quaternion curves", https://doi.org/10.1145/325334.325242;
mergekit's `slerp`.

Each tensor of the two experts, flattened to one vector, is interpolated along the great circle
between their directions: with cos(theta) = <a/|a|, b/|b|>,

    slerp(t) = sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b

and linearly, `(1 - t) a + t b`, where the two are (anti)parallel (|cos| > `dot_threshold`).
t = 0 is the first expert, t = 1 the second. The norms come from the whole tensor, so SLERP
always receives whole tensors.

mergekit mapping: `merge_method: slerp` interpolates from `base_model` (t = 0) to the other
model; here that base model is the first expert and no base is read. `t` (a number, a gradient
list or a per-module mapping, as in mergekit) is `t`; mergekit's fixed thresholds
(`dot_threshold` 0.9995, eps 1e-8) are the same here.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import register
from .base import GramLoader, MergeMethod, Param
from .sparsify import serial_reductions

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = DOT_THRESHOLD, eps: float = EPS) -> torch.Tensor:
    """Interpolate the whole tensors `v0` (t = 0) and `v1` (t = 1) in float32 (float64 stays)."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(-1).to(dtype), v1.reshape(-1).to(dtype)
    if a.numel() == 0:
        return a.reshape(v0.shape)
    with serial_reductions():
        norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
        norm_a = torch.where(norm_a > eps, norm_a, 1)
        norm_b = torch.where(norm_b > eps, norm_b, 1)
        dot = ((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        coef_a, coef_b = torch.tensor(1 - t, dtype=dtype), torch.tensor(t, dtype=dtype)
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coef_a, coef_b = torch.sin((1 - t) * theta) / sin_theta, torch.sin(t * theta) / sin_theta
    return (coef_a * a + coef_b * b).reshape(v0.shape)


T = Param("t", float, 0.5, "where between the first expert (0) and the second (1)", low=0.0, high=1.0)


@register
class Slerp(MergeMethod):
    name = "slerp"
    paper = "https://doi.org/10.1145/325334.325242"
    params = (T,)
    row_separable = False  # the angle comes from the whole tensor

    def prepare(self, tensor_names: Sequence[str], *, num_experts: Optional[int] = None, device: str = "cpu") -> None:
        super().prepare(tensor_names, num_experts=num_experts, device=device)
        if num_experts is not None:
            check_two(num_experts)

    def merge(self, name: str, tensors: Sequence[torch.Tensor], *, grams: Optional[Sequence[GramLoader]] = None, base: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_two(len(tensors))
        return slerp(self.value("t", name), tensors[0], tensors[1])


def check_two(num_experts: int) -> None:
    if num_experts != 2:
        raise ValueError(f"slerp interpolates exactly two experts, got {num_experts}; for more use karcher (their spherical mean) or another method")
