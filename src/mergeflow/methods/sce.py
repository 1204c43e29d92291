"""SCE: Select, Calculate, Erase, FuseChat's merge of task vectors (Wan et al., 2024).

"FuseChat: Knowledge Fusion of Chat Models", https://arxiv.org/abs/2408.07990; mergekit's `sce`.

For the experts' task vectors `d_i = W_i - base`:
- Select: keep the `select_topk` fraction of entries (of those that vary at all) with the largest
  variance across the experts, the same entries for every expert (all with `select_topk` 1);
- Calculate: each expert's weight is the mean square of its selected task vector, normalised to
  sum 1 (equal weights when all are ~0);
- Erase: elect each entry's sign as TIES does (+ on exact ties) and drop the disagreeing entries;
- merged = base + sum_i w_i d_i / sum_i w_i, both sums over the agreeing entries.

mergekit mapping: `sce` with `select_topk` as named; it reads no weights (they are computed).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import register
from .base import GramLoader, MergeMethod, Param
from .sparsify import serial_reductions, sign_consensus


def sce_mask(deltas: torch.Tensor, select_topk: float) -> torch.Tensor:
    """1 on the `floor(select_topk * nonzero)` entries of largest variance across the experts."""
    if select_topk <= 0:
        return torch.zeros_like(deltas[0])
    if select_topk >= 1:
        return torch.ones_like(deltas[0])
    var = torch.var(deltas, dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * select_topk)
    mask = torch.zeros_like(var)
    if k:
        mask.view(-1)[torch.argsort(var.abs().reshape(-1), descending=True, stable=True)[:k]] = 1
    return mask


def sce(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, select_topk: float = 1.0) -> torch.Tensor:
    """Select, Calculate, Erase (float32)."""
    base32 = base.to(torch.float32)
    deltas = torch.stack([t.to(torch.float32) - base32 for t in tensors])
    if select_topk < 1:
        deltas *= sce_mask(deltas, select_topk).unsqueeze(0)
    agree = sign_consensus(deltas)
    with serial_reductions():
        weights = deltas.square().reshape(len(tensors), -1).mean(dim=1)
    total = float(weights.sum())
    weights = torch.full_like(weights, 1 / len(tensors)) if abs(total) < 1e-6 else weights / total
    erased = weights.reshape(-1, *([1] * base.dim())) * agree
    merged = (deltas * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)
    return base32 + merged


SELECT_TOPK = Param("select_topk", float, 1.0, "fraction of entries kept, those varying most across the experts", low=0.0, high=1.0)


@register
class Sce(MergeMethod):
    name = "sce"
    paper = "https://arxiv.org/abs/2408.07990"
    uses_base = True
    row_separable = False  # the variance ranking is over the whole tensor
    params = (SELECT_TOPK,)

    def merge(self, name: str, tensors: Sequence[torch.Tensor], *, grams: Optional[Sequence[GramLoader]] = None, base: Optional[torch.Tensor] = None) -> torch.Tensor:
        return sce(base, tensors, select_topk=self.value("select_topk", name))
