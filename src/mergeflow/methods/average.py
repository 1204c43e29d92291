"""Weight averaging: the (weighted) mean of the experts' tensors (model soups, Wortsman et al. 2022)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import register
from .base import WEIGHTS, GramLoader, MergeMethod, weighted_sum


@register
class Average(MergeMethod):
    name = "average"
    paper = "https://arxiv.org/abs/2203.05482"
    params = (WEIGHTS,)

    def merge(self, name: str, tensors: Sequence[torch.Tensor], *, grams: Optional[Sequence[GramLoader]] = None, base: Optional[torch.Tensor] = None) -> torch.Tensor:
        return weighted_sum(tensors, self.expert_weights(name, len(tensors), normalise=True))
