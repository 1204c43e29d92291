"""TIES-Merging: Resolving Interference When Merging Models (Yadav et al., NeurIPS 2023).

For each tensor: take every expert's task vector `tau_i = W_i - base` (times its weight, 1 by
default); trim it to its `density` fraction of largest-magnitude entries; elect each entry's sign
as the sign of the sum of the trimmed vectors; average, per entry, only the trimmed values that
agree with the elected sign; add `scaling` times that to the base. Trimming ranks entries over the
whole tensor, so TIES always receives whole tensors.

Two conventions (`convention`), which differ in three details:

| | `mergeflow` (default) | `mergekit` (mergekit 0.1.5's `ties`) |
|---|---|---|
| entries kept per task vector | `ceil(density * n)` (and ties at the threshold) | `max(1, floor(density * n))` |
| sign where the sum is exactly 0 | 0: the entry stays the base's | +: the positive entries are kept |
| merged entry | mean of the agreeing entries (their count) | agreeing mass / agreeing weights |

With equal weights only the first two differ, and only at density boundaries and exact sign
ties. `mergeflow` stays the default so that merges made before the option give the same bytes;
`mergekit` reproduces mergekit's `ties` (with its `normalize: true`) to float rounding, for
configs brought from mergekit (`weight` -> `weights`, `lambda` -> `scaling`, `density`).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from . import register
from .base import WEIGHTS, GramLoader, MergeMethod, Param
from .sparsify import magnitude, merge_task_vectors
from .task_arithmetic import SCALING

DENSITY = Param("density", float, 0.2, "fraction of each task vector kept (largest magnitudes)", low=0.0, high=1.0, low_open=True)
CONVENTION = Param("convention", str, "mergeflow", "mergeflow: ceil(density n) kept, 0 on sign ties, count mean; mergekit: floor, +, weight-normalised mean", choices=("mergeflow", "mergekit"), per_layer=False)


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
    params = (WEIGHTS, SCALING, DENSITY, CONVENTION)

    def merge(self, name: str, tensors: Sequence[torch.Tensor], *, grams: Optional[Sequence[GramLoader]] = None, base: Optional[torch.Tensor] = None) -> torch.Tensor:
        base32 = base.to(torch.float32)
        weights = self.expert_weights(name, len(tensors), normalise=False)
        density = self.value("density", name)
        if self.value("convention", name) == "mergekit":
            thin = lambda delta, i: magnitude(delta, density)  # noqa: E731
            return merge_task_vectors(base, tensors, weights, sparsify=thin, consensus=True, normalize=True, scaling=self.value("scaling", name))
        taus = torch.stack([trim((t.to(torch.float32) - base32) * w, density) for t, w in zip(tensors, weights)])
        sign = torch.sign(taus.sum(dim=0))
        agree = (torch.sign(taus) == sign) & (taus != 0)
        merged = (taus * agree).sum(dim=0) / agree.sum(dim=0).clamp_min(1)
        return base32 + self.value("scaling", name) * merged
