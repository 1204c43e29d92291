"""Weight averaging: the plain mean of the experts' tensors (model soups, Wortsman et al. 2022)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import register
from .base import MergeMethod


@register
class Average(MergeMethod):
    name = "average"

    def merge(self, name: str, tensors: Sequence[torch.Tensor], grams: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        return torch.stack([t.to(torch.float32) for t in tensors]).mean(dim=0)

    def config(self) -> dict:
        return {"method": self.name}
