"""TIES-Merging: Resolving Interference When Merging Models (Yadav et al., NeurIPS 2023).

For each tensor: take every expert's task vector `tau_i = W_i - base` (times its weight, 1 by
default); trim it to its `density` fraction of largest-magnitude entries; elect each entry's sign
as the sign of the sum of the trimmed vectors; average, per entry, only the trimmed values that
agree with the elected sign; add `scaling` times that to the base. Trimming ranks entries over the
whole tensor, so TIES always receives whole tensors.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from . import register
from .base import WEIGHTS, GramLoader, MergeMethod, Param
from .task_arithmetic import SCALING

DENSITY = Param("density", float, 0.2, "fraction of each task vector kept (largest magnitudes)", low=0.0, high=1.0, low_open=True)


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `ceil(density * numel)` entries of largest magnitude, zero the rest."""
    k = math.ceil(density * tau.numel())
    if k >= tau.numel():
        return tau
    threshold = tau.abs().flatten().kthvalue(tau.numel() - k + 1).values
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


@register
class Ties(MergeMethod):
    name = "ties"
    paper = "https://arxiv.org/abs/2306.01708"
    uses_base = True
    row_separable = False
    params = (WEIGHTS, SCALING, DENSITY)

    def merge(self, name: str, tensors: Sequence[torch.Tensor], *, grams: Optional[Sequence[GramLoader]] = None, base: Optional[torch.Tensor] = None) -> torch.Tensor:
        base32 = base.to(torch.float32)
        weights = self.expert_weights(name, len(tensors), normalise=False)
        density = self.value("density", name)
        taus = torch.stack([trim((t.to(torch.float32) - base32) * w, density) for t, w in zip(tensors, weights)])
        sign = torch.sign(taus.sum(dim=0))
        agree = (torch.sign(taus) == sign) & (taus != 0)
        merged = (taus * agree).sum(dim=0) / agree.sum(dim=0).clamp_min(1)
        return base32 + self.value("scaling", name) * merged
