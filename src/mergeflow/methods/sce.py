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

import math
from typing import Optional, Sequence

import torch

from . import register
from .base import GramLoader, MergeMethod, Param
from .select import Window, magnitude_keys
from .sparsify import sign_consensus
from .streaming import Statistics, dot64, gather


def task_vectors(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    base32 = base.to(torch.float32)
    return torch.stack([t.to(torch.float32) - base32 for t in tensors])


class Selection(Statistics):
    """SCE's tensor-wide numbers: which entries vary most across the experts (`select_topk` of the
    nonzero variances, exact ranks over the whole tensor: two passes of `select.Window`), then
    each expert's mean square over the selected entries (float64, one more pass)."""

    def __init__(self, numel: int, select_topk: float):
        self.numel, self.select_topk = numel, select_topk
        self.window = Window(numel, 0, None) if 0 < select_topk < 1 else None
        self.select_passes = Window.passes if self.window else 0
        self.passes = self.select_passes + 1
        self.nonzero, self.squares, self.weights = 0, None, None

    def mask(self, deltas: torch.Tensor) -> Optional[torch.Tensor]:
        """This block's selected entries (None: all), blocks in stream order."""
        if self.select_topk <= 0:
            return torch.zeros(deltas.shape[1:], dtype=torch.bool)
        return None if self.window is None else self.window.mask(magnitude_keys(torch.var(deltas, dim=0, unbiased=False), descending=True))

    def observe(self, step: int, tensors: Sequence[torch.Tensor], base: Optional[torch.Tensor]) -> None:
        deltas = task_vectors(base, tensors)
        if step < self.select_passes:
            var = torch.var(deltas, dim=0, unbiased=False)
            self.nonzero += int(torch.count_nonzero(var)) if step == 0 else 0
            self.window.observe(step, magnitude_keys(var, descending=True))
            return
        mask = self.mask(deltas)
        if mask is not None:
            deltas *= mask
        squares = torch.tensor([dot64(d, d) for d in deltas], dtype=torch.float64)
        self.squares = squares if self.squares is None else self.squares + squares

    def end_pass(self, step: int) -> None:
        if step < self.select_passes:
            if step == 0:
                self.window.stop = int(self.nonzero * self.select_topk)
            self.window.end_pass(step)
            return
        weights = (self.squares / max(1, self.numel)).to(torch.float32)
        total = float(weights.sum())
        self.weights = torch.full_like(weights, 1 / len(weights)) if abs(total) < 1e-6 else weights / total
        if self.window is not None:
            self.window.restart()


def sce(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, select_topk: float = 1.0, selection: Optional[Selection] = None) -> torch.Tensor:
    """Select, Calculate, Erase (float32) of whole tensors, or of one block given the whole tensors' `selection`."""
    selection = selection or gather(Selection(base.numel(), select_topk), tensors, base)
    deltas = task_vectors(base, tensors)
    mask = selection.mask(deltas)
    if mask is not None:
        deltas *= mask.unsqueeze(0)
    agree = sign_consensus(deltas)
    erased = selection.weights.reshape(-1, *([1] * base.dim())) * agree
    del agree
    merged = (deltas * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)
    return base.to(torch.float32) + merged


SELECT_TOPK = Param("select_topk", float, 1.0, "fraction of entries kept, those varying most across the experts", low=0.0, high=1.0)


@register
class Sce(MergeMethod):
    name = "sce"
    paper = "https://arxiv.org/abs/2408.07990"
    uses_base = True
    row_separable = False  # the variance ranking is over the whole tensor: streamed with `Selection`
    params = (SELECT_TOPK,)

    def block_copies(self, inputs: int) -> int:
        return 3 * inputs + 4  # the task vectors, their signs, weighted masks and products, variance, sums

    def statistics(self, name: str, shape: tuple[int, ...]) -> Selection:
        return Selection(math.prod(shape), self.value("select_topk", name))

    def merge(self, name: str, tensors: Sequence[torch.Tensor], *, grams: Optional[Sequence[GramLoader]] = None, base: Optional[torch.Tensor] = None,
              stats: Optional[Selection] = None) -> torch.Tensor:
        return sce(base, tensors, select_topk=self.value("select_topk", name), selection=stats)
