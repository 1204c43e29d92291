"""Model Stock: All we need is just a few fine-tuned models (Jang et al., ECCV 2024).

https://arxiv.org/abs/2403.19522; mergekit's `model_stock`.

The experts' task vectors `d_i = W_i - base` (at least two) span a region whose centre the
paper estimates from their angle alone: with cos(theta) the mean pairwise cosine similarity of
the d_i and N experts,

    t = N cos(theta) / (1 + (N - 1) cos(theta)),   merged = t * mean_i W_i + (1 - t) * base

per tensor (flattened; the angle from float64 sums over the row blocks), or per row with
`filter_wise` (each output filter its own angle; a 1-D tensor is one row). Where `1 + (N - 1) cos(theta)` is ~0 the base is kept.

mergekit mapping: `model_stock` with `filter_wise` as named; it reads no weights.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import register
from .base import GramLoader, MergeMethod, Param
from .sparsify import serial_reductions
from .streaming import Products, gather


class Offsets(Products):
    """The inner products of the experts' task vectors `W_i - base` over the whole tensor."""

    def vectors(self, tensors: Sequence[torch.Tensor], base: Optional[torch.Tensor]) -> list[torch.Tensor]:
        base32 = base.to(torch.float32)
        return [t.to(torch.float32) - base32 for t in tensors]


def interpolation(cos_theta: torch.Tensor, n: int) -> torch.Tensor:
    """Model Stock's t from the mean pairwise cosine of n task vectors (0 where singular)."""
    denominator = 1 + (n - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(cos_theta), n * cos_theta / torch.where(singular, 1, denominator))


def tensor_cosine(gram: torch.Tensor) -> torch.Tensor:
    """The mean pairwise cosine of the task vectors whose inner products are `gram` (float64)."""
    norms = gram.diagonal().sqrt()
    n = len(norms)
    cosines = [(gram[i, j] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1).to(torch.float32) for i in range(n) for j in range(i + 1, n)]
    return torch.stack(cosines).mean(dim=0).reshape(1)


def row_cosine(w0: torch.Tensor, ws: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean pairwise cosine of the task vectors' rows (one per row, `filter_wise`)."""
    offsets = [w - w0 for w in ws]
    cosines = []
    with serial_reductions():
        for i, a in enumerate(offsets):
            for b in offsets[i + 1 :]:
                norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
                cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    return torch.stack(cosines).mean(dim=0).unsqueeze(-1)


def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, filter_wise: bool = False, offsets: Optional[Offsets] = None) -> torch.Tensor:
    """Interpolate between the base and the experts' mean by the task vectors' mean angle (float32):
    the whole tensor's (from `offsets`, gathered here when not given) or, `filter_wise`, each row's."""
    w0 = base.to(torch.float32)
    ws = [t.to(torch.float32) for t in tensors]
    shape = w0.shape
    if filter_wise:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
        cos_theta = row_cosine(w0, ws)
    else:
        cos_theta = tensor_cosine((offsets or gather(Offsets(), tensors, base)).gram)
    t = interpolation(cos_theta, len(ws))
    return (t * (sum(ws) / len(ws)) + (1 - t) * w0).reshape(shape)


FILTER_WISE = Param("filter_wise", bool, False, "one angle per row (output filter) instead of per tensor", per_layer=False)


@register
class ModelStock(MergeMethod):
    name = "model_stock"
    paper = "https://arxiv.org/abs/2403.19522"
    params = (FILTER_WISE,)
    uses_base = True
    row_separable = False  # filter_wise alone would be; the default angle is the whole tensor's, streamed

    def block_copies(self, inputs: int) -> int:
        return 2 * inputs + 4  # the float32 copies, the task vectors, the sum and mean, both terms

    def statistics(self, name: str, shape: tuple[int, ...]) -> Optional[Offsets]:
        return None if self.value("filter_wise", name) else Offsets()

    def merge(self, name: str, tensors: Sequence[torch.Tensor], *, grams: Optional[Sequence[GramLoader]] = None, base: Optional[torch.Tensor] = None,
              stats: Optional[Offsets] = None) -> torch.Tensor:
        return model_stock(base, tensors, filter_wise=self.value("filter_wise", name), offsets=stats)
