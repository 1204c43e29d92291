"""Model Stock: All we need is just a few fine-tuned models (Jang et al., ECCV 2024).

https://arxiv.org/abs/2403.19522; mergekit's `model_stock`.

The experts' task vectors `d_i = W_i - base` (at least two) span a region whose centre the
paper estimates from their angle alone: with cos(theta) the mean pairwise cosine similarity of
the d_i and N experts,

    t = N cos(theta) / (1 + (N - 1) cos(theta)),   merged = t * mean_i W_i + (1 - t) * base

per tensor (flattened), or per row with `filter_wise` (each output filter its own angle; a
1-D tensor is one row). Where `1 + (N - 1) cos(theta)` is ~0 the base is kept.

mergekit mapping: `model_stock` with `filter_wise` as named; it reads no weights.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import register
from .base import GramLoader, MergeMethod, Param
from .sparsify import serial_reductions


def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, filter_wise: bool = False) -> torch.Tensor:
    """Interpolate between the base and the experts' mean by the task vectors' mean angle (float32)."""
    w0 = base.to(torch.float32)
    ws = [t.to(torch.float32) for t in tensors]
    shape = w0.shape
    if filter_wise:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    with serial_reductions():
        for i, a in enumerate(offsets):
            for b in offsets[i + 1 :]:
                norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
                cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos_theta), n * cos_theta / torch.where(singular, 1, denominator))
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape)


FILTER_WISE = Param("filter_wise", bool, False, "one angle per row (output filter) instead of per tensor", per_layer=False)


@register
class ModelStock(MergeMethod):
    name = "model_stock"
    paper = "https://arxiv.org/abs/2403.19522"
    params = (FILTER_WISE,)
    uses_base = True
    row_separable = False  # filter_wise alone would be; the default angle is the whole tensor's

    def merge(self, name: str, tensors: Sequence[torch.Tensor], *, grams: Optional[Sequence[GramLoader]] = None, base: Optional[torch.Tensor] = None) -> torch.Tensor:
        return model_stock(base, tensors, filter_wise=self.value("filter_wise", name))
