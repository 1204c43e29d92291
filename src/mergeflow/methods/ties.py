"""TIES-Merging: Resolving Interference When Merging Models (Yadav et al., NeurIPS 2023).

For each tensor: take every expert's task vector `tau_i = W_i - base` (times its weight, 1 by
default); trim it to its `density` fraction of largest-magnitude entries; elect each entry's sign
as the sign of the sum of the trimmed vectors; average, per entry, only the trimmed values that
agree with the elected sign; add `scaling` times that to the base. Trimming ranks entries over the
whole tensor: the engine finds each threshold exactly in two passes over the row blocks
(`select.py`) and merges the blocks in a third.

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
from typing import Callable, Optional, Sequence

import torch

from . import register
from .base import WEIGHTS, GramLoader, MergeMethod, Param
from .select import Window, magnitude_keys, ranked_mask
from .sparsify import RankThinning, merge_task_vectors
from .streaming import Statistics, gather
from .task_arithmetic import SCALING

DENSITY = Param("density", float, 0.2, "fraction of each task vector kept (largest magnitudes)", low=0.0, high=1.0, low_open=True)
CONVENTION = Param("convention", str, "mergeflow", "mergeflow: ceil(density n) kept, 0 on sign ties, count mean; mergekit: floor, +, weight-normalised mean", choices=("mergeflow", "mergekit"), per_layer=False)


class Trims(Statistics):
    """Each expert's trim threshold: the `k`-th largest magnitude of its weighted task vector over
    the whole tensor (exact, two passes of `select.Window`); `weigh(n)`: the weights of n experts."""

    passes = 2

    def __init__(self, numel: int, k: int, weigh: Callable[[int], list[float]]):
        self.numel, self.k, self.weigh = numel, k, weigh
        self.windows: list[Window] = []

    def observe(self, step: int, tensors: Sequence[torch.Tensor], base: Optional[torch.Tensor]) -> None:
        base32 = base.to(torch.float32)
        self.windows = self.windows or [Window(self.numel, self.numel - self.k, self.numel, keep_ties=True) for _ in tensors]
        for window, t, w in zip(self.windows, tensors, self.weigh(len(tensors))):
            window.observe(step, magnitude_keys((t.to(torch.float32) - base32) * w))

    def end_pass(self, step: int) -> None:
        for window in self.windows:
            window.end_pass(step)


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `ceil(density * numel)` entries of largest magnitude (and the ties at the threshold), zero the rest."""
    k = math.ceil(density * tau.numel())
    if k >= tau.numel():
        return tau
    return tau.masked_fill(~ranked_mask(tau, tau.numel() - k, tau.numel(), keep_ties=True), 0.0)


def ties_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float], scaling: float, trims: Optional[Trims]) -> torch.Tensor:
    """TIES (mergeflow convention) of one block: trim each weighted task vector at its threshold,
    elect signs, average the agreeing entries (by their count); in place where that saves a copy."""
    base32 = base.to(torch.float32)
    taus = torch.empty((len(tensors), *base.shape), dtype=torch.float32)
    for i, (t, w) in enumerate(zip(tensors, weights)):
        torch.sub(t.to(torch.float32), base32, out=taus[i]).mul_(w)
        if trims is not None:
            taus[i].masked_fill_(~trims.windows[i].mask(magnitude_keys(taus[i])), 0.0)
    sign = taus.sum(dim=0).sign_()
    count = torch.zeros_like(sign)
    for tau in taus:
        agree = (tau.sign() == sign) & (tau != 0)
        tau.mul_(agree)
        count += agree
    merged = taus.sum(dim=0).div_(count.clamp_min_(1))
    del taus, count
    return base32 + scaling * merged


@register
class Ties(MergeMethod):
    name = "ties"
    paper = "https://arxiv.org/abs/2306.01708"
    uses_base = True
    row_separable = False  # trimming ranks the whole tensor: streamed with its thresholds
    params = (WEIGHTS, SCALING, DENSITY, CONVENTION)

    def block_copies(self, inputs: int) -> int:
        return 2 * inputs + 6  # the task vectors, their sum, signs and counts, the output

    def statistics(self, name: str, shape: tuple[int, ...]) -> Optional[Statistics]:
        numel, density = math.prod(shape), self.value("density", name)
        if self.value("convention", name) == "mergekit":
            return RankThinning(numel, (0, max(1, int(density * numel))), descending=True) if density < 1 and numel else None
        k = math.ceil(density * numel)
        return Trims(numel, k, lambda n: self.expert_weights(name, n, normalise=False)) if k < numel else None

    def merge(self, name: str, tensors: Sequence[torch.Tensor], *, grams: Optional[Sequence[GramLoader]] = None, base: Optional[torch.Tensor] = None,
              stats: Optional[Statistics] = None) -> torch.Tensor:
        weights = self.expert_weights(name, len(tensors), normalise=False)
        stats = stats or gather(self.statistics(name, tuple(base.shape)), tensors, base)
        if self.value("convention", name) == "mergekit":
            return merge_task_vectors(base, tensors, weights, sparsify=stats.thin if stats else None, consensus=True, normalize=True, scaling=self.value("scaling", name))
        return ties_merge(base, tensors, weights, self.value("scaling", name), stats)
