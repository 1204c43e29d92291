"""Fisher merging: Merging Models with Fisher-Weighted Averaging (Matena & Raffel, NeurIPS 2022),
https://arxiv.org/abs/2111.09832.

Each parameter is averaged with the experts' diagonal Fisher information as weights:

    merged = sum_i w_i F_i theta_i / sum_i w_i F_i,   F_i = max(F_i, fisher_floor)

where `F_i` is expert i's diagonal Fisher on its own calibration data (the `fisher@<expert>` stage,
`mergeflow fisher`; `fisher/compute.py` says which estimator) and `w_i` the expert weights
(`merge.weights`, equal by default, normalised). The floor keeps parameters that no calibration
row moves (embeddings of unseen tokens: F = 0 for every expert) at the weighted average instead of
0/0. FusionBench adds its `minimal_fisher_weight` (1e-6) instead of flooring; the two differ by at
most the floor. A tensor no Fisher covers (none stored for it) is weighted-averaged.
Streaming (`block_copies`): the engine hands it every tensor and its Fisher in the same blocks of
rows, sized so that its working set stays within `STREAM_BYTES`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import register
from .base import WEIGHTS, GramLoader, MergeMethod, Param, weighted_sum

FLOOR = Param("fisher_floor", float, 1e-6, "floor on each expert's Fisher (FusionBench's minimal_fisher_weight): parameters no "
              "calibration row moves get the weighted average", low=0.0, low_open=True)


@register
class Fisher(MergeMethod):
    name = "fisher"
    paper = "https://arxiv.org/abs/2111.09832"
    params = (WEIGHTS, FLOOR)
    uses_fisher = True  # the engine passes `fisher=`: one tensor (or None) per expert, the same rows

    def block_copies(self, inputs: int) -> int:
        return 2 * inputs + 4  # each expert's block and its Fisher's, num, den, one weighted Fisher, one upcast expert

    def merge(self, name: str, tensors: Sequence[torch.Tensor], *, grams: Optional[Sequence[GramLoader]] = None,
              base: Optional[torch.Tensor] = None, fisher: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
        weights = self.expert_weights(name, len(tensors), normalise=True)
        if fisher is None or any(f is None for f in fisher):
            return weighted_sum(tensors, weights)
        floor = self.value("fisher_floor", name)
        num = torch.zeros(tensors[0].shape, dtype=torch.float32)
        den = torch.zeros_like(num)
        for t, f, w in zip(tensors, fisher, weights):
            if f.shape != t.shape:
                raise ValueError(f"{name}: Fisher of shape {tuple(f.shape)} for a tensor of shape {tuple(t.shape)}; recompute the Fisher for these experts")
            wf = f.to(torch.float32).clamp_min(floor).mul_(w)
            num.addcmul_(wf, t.to(torch.float32))
            den.add_(wf)
        return num.div_(den)
