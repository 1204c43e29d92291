"""Karcher mean: the weighted centre of mass of the experts on the sphere (Karcher, CPAM 1977).

Karcher, "Riemannian center of mass and mollifier smoothing", https://doi.org/10.1002/cpa.3160300502;
mergekit's `karcher`, which cites https://arxiv.org/abs/2603.04972.

Each tensor is split into its norm and its unit direction; the weighted mean direction is found
by fixed-point (Riemannian gradient) iterations from the normalised linear mean, at most
`max_iter` of them, stopping when the tangent step is below `tol`; the result is that direction
times the weighted mean norm. Tensors of norm <= `tol` are left out of the direction. It
generalises SLERP to any number of models, and needs no base. The iteration needs only the
tensors' inner products (float64, one pass over the row blocks): it runs on the coefficients of
the mean in the span of the tensors, and the blocks are then merged as that combination.

mergekit mapping: `max_iter`, `tol` as named. mergekit always weights the models equally; here
`weights` (normalised) may differ, and equal weights are mergekit's.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from . import register
from .base import WEIGHTS, GramLoader, MergeMethod, Param
from .streaming import Products, gather


def karcher_coefficients(gram: torch.Tensor, weights: Sequence[float], *, max_iter: int, tol: float) -> list[float]:
    """c with Karcher mean = sum_i c_i t_i, from the tensors' inner products `gram` (float64).

    The mean direction starts in the span of the unit tensors u_i and every fixed-point step stays
    there (the tangent is a combination of the u_i and the mean), so the iteration runs on its
    coefficients beta (mean = sum_i beta_i u_i, <u_i, u_j> = G_ij / (|t_i| |t_j|)): one pass over
    the tensor for `gram`, none per iteration."""
    n = len(weights)
    norms = gram.diagonal().sqrt()
    valid = [i for i in range(n) if float(norms[i]) > tol]
    if not valid:
        return [0.0] * n
    units = gram[valid][:, valid] / torch.outer(norms[valid], norms[valid])
    total = sum(weights[i] for i in valid)
    alphas = torch.tensor([weights[i] / total for i in valid], dtype=torch.float64)
    length = lambda beta: float(beta @ units @ beta) ** 0.5  # noqa: E731
    beta = alphas.clone() if length(alphas) >= tol else torch.eye(len(valid), dtype=torch.float64)[0]
    beta = beta / length(beta)
    for _ in range(max_iter):
        tangent = torch.zeros_like(beta)
        for k, a in enumerate(alphas):
            dot = min(1.0, max(-1.0, float(beta @ units[:, k])))
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent -= float(a) * theta / math.sin(theta) * dot * beta
            tangent[k] += float(a) * theta / math.sin(theta)
        step = length(tangent)
        if step < tol:
            break
        beta = math.cos(step) * beta + math.sin(step) * (tangent / step)
        if length(beta) > tol:
            beta = beta / length(beta)
    scale = sum(w * float(norm) for w, norm in zip(weights, norms))
    coefficients = [0.0] * n
    for k, i in enumerate(valid):
        coefficients[i] = scale * float(beta[k]) / float(norms[i])
    return coefficients


def karcher_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, max_iter: int = 10, tol: float = 1e-5,
                 products: Optional[Products] = None) -> torch.Tensor:
    """The weighted Karcher mean of whole tensors (or of blocks of them, given the whole tensors'
    `products`), in float32; `weights` sum to 1."""
    if len(tensors) == 1:
        return tensors[0].to(torch.float32)
    gram = (products or gather(Products(), tensors, None)).gram
    coefficients = karcher_coefficients(gram, weights, max_iter=max_iter, tol=tol)
    out = torch.zeros(tensors[0].shape, dtype=torch.float32)
    for c, t in zip(coefficients, tensors):
        out.add_(t.to(torch.float32), alpha=c)
    return out


MAX_ITER = Param("max_iter", int, 10, "most fixed-point iterations", low=1, per_layer=False)
TOL = Param("tol", float, 1e-5, "stop when the step is shorter; norms below it count as zero", low=0.0, low_open=True)


@register
class Karcher(MergeMethod):
    name = "karcher"
    paper = "https://doi.org/10.1002/cpa.3160300502"
    params = (WEIGHTS, MAX_ITER, TOL)
    row_separable = False  # norms and angles of whole tensors: streamed with their inner products

    def block_copies(self, inputs: int) -> int:
        return inputs + 2  # the output and one expert's float32 copy

    def statistics(self, name: str, shape: tuple[int, ...]) -> Products:
        return Products()

    def merge(self, name: str, tensors: Sequence[torch.Tensor], *, grams: Optional[Sequence[GramLoader]] = None, base: Optional[torch.Tensor] = None,
              stats: Optional[Products] = None) -> torch.Tensor:
        weights = self.expert_weights(name, len(tensors), normalise=True)
        return karcher_mean(tensors, weights, max_iter=self.value("max_iter", name), tol=self.value("tol", name), products=stats)
