"""NuSLERP: mergekit's revised SLERP (https://github.com/arcee-ai/mergekit, `nuslerp`), spherical
interpolation (Shoemake 1985, https://doi.org/10.1145/325334.325242) of two experts set by
their relative weights, optionally of their task vectors.

With weights w_0, w_1 (mergekit's `weight`), t = w_1 / (w_0 + w_1) (0.5 where the sum is ~0).
With `nuslerp_flatten` (the default) each tensor is one vector; otherwise each row
(`nuslerp_row_wise: false`, along the last dimension) or each column (`nuslerp_row_wise: true`,
along dimension 0) is interpolated on its own sphere. With a base model (`use_base`) the task
vectors `W_i - base` are interpolated and added back to the base, as mergekit does when a
`base_model` is given.

mergekit mapping: `weight` -> `weights` (per expert), `nuslerp_flatten`, `nuslerp_row_wise` as
named; `base_model` given -> `use_base: true`.
"""

from __future__ import annotations

import torch

EPS = 1e-8


def _normalize(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=eps)


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool = False, flatten: bool = True, eps: float = EPS) -> torch.Tensor:
    """Spherical interpolation of `v0` (t = 0) and `v1` (t = 1) along the chosen dimension."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    cos_theta = torch.sum(_normalize(v0) * _normalize(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def interpolation_t(weights: list[float]) -> float:
    """mergekit's t from the two experts' weights."""
    total = sum(weights)
    return 0.5 if abs(total) < 1e-6 else weights[1] / total
