"""Karcher mean: the weighted centre of mass of the experts on the sphere (Karcher, CPAM 1977).

Karcher, "Riemannian center of mass and mollifier smoothing", https://doi.org/10.1002/cpa.3160300502;
mergekit's `karcher`, which cites https://arxiv.org/abs/2603.04972.

Each tensor is split into its norm and its unit direction; the weighted mean direction is found
by fixed-point (Riemannian gradient) iterations from the normalised linear mean, at most
`max_iter` of them, stopping when the tangent step is below `tol`; the result is that direction
times the weighted mean norm. Tensors of norm <= `tol` are left out of the direction. It
generalises SLERP to any number of models, and needs no base.

mergekit mapping: `max_iter`, `tol` as named. mergekit always weights the models equally; here
`weights` (normalised) may differ, and equal weights are mergekit's.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import register
from .base import WEIGHTS, GramLoader, MergeMethod, Param
from .sparsify import serial_reductions


def _unit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norm = torch.linalg.vector_norm(x)
    return (x / norm if float(norm) > 0 else torch.zeros_like(x)), norm


def karcher_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The weighted Karcher mean of whole tensors, in float32; `weights` sum to 1."""
    with serial_reductions():  # norms and dots all through
        return _karcher_mean(tensors, weights, max_iter=max_iter, tol=tol)


def _karcher_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, max_iter: int, tol: float) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0].to(torch.float32)
    units, norms = zip(*(_unit(t.to(torch.float32)) for t in tensors))
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return torch.zeros_like(units[0])
    total = sum(weights[i] for i in valid)
    alphas = [weights[i] / total for i in valid]
    dirs = [units[i] for i in valid]
    mean = sum(a * u for a, u in zip(alphas, dirs))
    mean_norm = torch.linalg.vector_norm(mean)
    mean = dirs[0].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(alphas, dirs):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        step = torch.linalg.vector_norm(tangent)
        if float(step) < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * (tangent / step)
        unit_norm = torch.linalg.vector_norm(mean)
        if float(unit_norm) > tol:
            mean = mean / unit_norm
    return sum(w * n for w, n in zip(weights, norms)) * mean


MAX_ITER = Param("max_iter", int, 10, "most fixed-point iterations", low=1, per_layer=False)
TOL = Param("tol", float, 1e-5, "stop when the step is shorter; norms below it count as zero", low=0.0, low_open=True)


@register
class Karcher(MergeMethod):
    name = "karcher"
    paper = "https://doi.org/10.1002/cpa.3160300502"
    params = (WEIGHTS, MAX_ITER, TOL)
    row_separable = False

    def merge(self, name: str, tensors: Sequence[torch.Tensor], *, grams: Optional[Sequence[GramLoader]] = None, base: Optional[torch.Tensor] = None) -> torch.Tensor:
        weights = self.expert_weights(name, len(tensors), normalise=True)
        return karcher_mean(tensors, weights, max_iter=self.value("max_iter", name), tol=self.value("tol", name))
