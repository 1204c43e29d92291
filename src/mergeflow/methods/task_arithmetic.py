"""Task arithmetic: Editing Models with Task Arithmetic (Ilharco et al., ICLR 2023).

`merged = base + scaling * sum_i w_i (W_i - base)`: the experts' task vectors, weighted (1 each
by default, not normalised) and scaled by lambda (`scaling`), added back to the base model.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import register
from .base import WEIGHTS, GramLoader, MergeMethod, Param

SCALING = Param("scaling", float, 1.0, "lambda: the factor on the merged task vector")


@register
class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    paper = "https://arxiv.org/abs/2212.04089"
    uses_base = True
    params = (WEIGHTS, SCALING)

    def block_copies(self, inputs: int) -> int:
        return inputs + 3  # the base's float32 copy, the summed delta, one expert's delta

    def merge(self, name: str, tensors: Sequence[torch.Tensor], *, grams: Optional[Sequence[GramLoader]] = None, base: Optional[torch.Tensor] = None) -> torch.Tensor:
        base32 = base.to(torch.float32, copy=True)  # never modify the caller's tensor in place
        delta = torch.zeros_like(base32)
        for t, w in zip(tensors, self.expert_weights(name, len(tensors), normalise=False)):
            delta.add_(t.to(torch.float32) - base32, alpha=w)
        return base32.add_(delta, alpha=self.value("scaling", name))
