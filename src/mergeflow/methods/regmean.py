"""RegMean: Dataless Knowledge Fusion by Merging Weights of Language Models (Jin et al., ICLR 2023).

For a Linear with weights `W_i` (out x in) and per-token mean grams `G_i` of its inputs, the merged
weight minimises `sum_i ||X_i W^T - X_i W_i^T||^2`, i.e. solves

    (sum_i G~_i) W^T = sum_i G~_i W_i^T,   G~_i = alpha * G_i + (1 - alpha) * diag(G_i)

(alpha shrinks the off-diagonals: 1 is full RegMean, 0 a diagonal-weighted average). The system is
solved by Cholesky, and by least squares where it is not positive definite. Every other tensor
(embeddings, norms, an untied `lm_head` without grams) is averaged.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from . import register
from .base import MergeMethod

log = logging.getLogger(__name__)


@register
class RegMean(MergeMethod):
    name = "regmean"
    uses_grams = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.fell_back: list[str] = []

    def shrink(self, gram: torch.Tensor) -> torch.Tensor:
        """`alpha * G + (1 - alpha) * diag(G)`: off-diagonals scaled by alpha, diagonal kept."""
        return self.alpha * gram + (1.0 - self.alpha) * torch.diag(torch.diagonal(gram))

    def merge(self, name: str, tensors: Sequence[torch.Tensor], grams: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        if grams is None:
            return torch.stack([t.to(torch.float32) for t in tensors]).mean(dim=0)
        dtype = self.solver_dtype
        lhs = sum(self.shrink(g.to(dtype)) for g in grams)
        rhs = sum(self.shrink(g.to(dtype)) @ w.to(dtype).T for g, w in zip(grams, tensors))
        chol, info = torch.linalg.cholesky_ex(lhs)
        if int(info) == 0:
            solution = torch.cholesky_solve(rhs, chol)
        else:
            self.fell_back.append(name)
            log.warning("%s: gram sum is not positive definite; solved by least squares", name)
            solution = torch.linalg.lstsq(lhs, rhs).solution
        if log.isEnabledFor(logging.DEBUG):
            residual = torch.linalg.matrix_norm(lhs @ solution - rhs) / torch.linalg.matrix_norm(rhs).clamp_min(1e-30)
            log.debug("%s: relative residual %.3e", name, float(residual))
        return solution.T
