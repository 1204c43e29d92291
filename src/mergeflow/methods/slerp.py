"""SLERP: spherical linear interpolation between two experts (Shoemake, SIGGRAPH 1985).

Shoemake, "Animating rotation with quaternion curves", https://doi.org/10.1145/325334.325242;
mergekit's `slerp`.

Each tensor of the two experts, flattened to one vector, is interpolated along the great circle
between their directions: with cos(theta) = <a/|a|, b/|b|> (float64 sums over the row blocks),

    slerp(t) = sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b

and linearly, `(1 - t) a + t b`, where the two are (anti)parallel (|cos| > `dot_threshold`).
t = 0 is the first expert, t = 1 the second. The norms come from the whole tensor: the engine
streams it twice, once for the inner products and once to interpolate.

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
from .streaming import Products, gather

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp_coefficients(t: float, gram: torch.Tensor, dtype: torch.dtype, dot_threshold: float = DOT_THRESHOLD, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors of `a` and `b` in slerp(t), from their inner products `gram` (2 x 2, float64)."""
    norm_a, norm_b = (float(gram[i, i]) ** 0.5 for i in range(2))
    norm_a, norm_b = (n if n > eps else 1.0 for n in (norm_a, norm_b))
    dot = torch.tensor(float(gram[0, 1]) / (norm_a * norm_b), dtype=dtype).clamp(-1, 1)
    if dot.abs() > dot_threshold:
        return torch.tensor(1 - t, dtype=dtype), torch.tensor(t, dtype=dtype)
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return torch.sin((1 - t) * theta) / sin_theta, torch.sin(t * theta) / sin_theta


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = DOT_THRESHOLD, eps: float = EPS) -> torch.Tensor:
    """Interpolate the whole tensors `v0` (t = 0) and `v1` (t = 1) in float32 (float64 stays)."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.to(dtype), v1.to(dtype)
    coef_a, coef_b = slerp_coefficients(t, gather(Products(), [a, b], None).gram, dtype, dot_threshold, eps)
    return coef_a * a + coef_b * b


T = Param("t", float, 0.5, "where between the first expert (0) and the second (1)", low=0.0, high=1.0)


@register
class Slerp(MergeMethod):
    name = "slerp"
    paper = "https://doi.org/10.1145/325334.325242"
    params = (T,)
    row_separable = False  # the angle comes from the whole tensor: streamed with its inner products

    def block_copies(self, inputs: int) -> int:
        return inputs + 3  # both terms and their sum

    def statistics(self, name: str, shape: tuple[int, ...]) -> Products:
        return Products()

    def prepare(self, tensor_names: Sequence[str], *, num_experts: Optional[int] = None, device: str = "cpu") -> None:
        super().prepare(tensor_names, num_experts=num_experts, device=device)
        if num_experts is not None:
            check_two(num_experts)

    def merge(self, name: str, tensors: Sequence[torch.Tensor], *, grams: Optional[Sequence[GramLoader]] = None, base: Optional[torch.Tensor] = None,
              stats: Optional[Products] = None) -> torch.Tensor:
        check_two(len(tensors))
        if stats is None:
            return slerp(self.value("t", name), tensors[0], tensors[1])
        dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
        coef_a, coef_b = slerp_coefficients(self.value("t", name), stats.gram, dtype)
        return coef_a * tensors[0].to(dtype) + coef_b * tensors[1].to(dtype)


def check_two(num_experts: int) -> None:
    if num_experts != 2:
        raise ValueError(f"slerp interpolates exactly two experts, got {num_experts}; for more use karcher (their spherical mean) or another method")
