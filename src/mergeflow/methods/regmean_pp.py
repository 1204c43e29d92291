"""RegMean++: Enhancing Effectiveness and Generalization of Regression Mean for Model Merging
(Nguyen et al. 2025), https://arxiv.org/abs/2508.03121.

RegMean's solve (`regmean.py`, the same `alpha`, `weights`, `solver_dtype`), with grams taken layer
by layer on the inputs that the already-merged layers produce instead of each expert's own: see
`mergeflow.regmean_pp`, the engine it runs through (`mergeflow merge --method regmean_pp --calib
FILE ...`; in the pipeline the merge stage passes data/calib). It needs no gram directories but the
experts' calibration data, so each merge runs forward passes (about the cost of computing grams).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import register
from .base import GramLoader
from .regmean import RegMean


@register
class RegMeanPP(RegMean):
    name = "regmean_pp"
    paper = "https://arxiv.org/abs/2508.03121"
    uses_grams = False  # it makes its own, layer by layer
    needs_calibration = True  # merged by `regmean_pp.merge_regmean_pp`, not tensor by tensor

    def solve(self, name: str, tensors: Sequence[torch.Tensor], grams: Optional[Sequence[GramLoader]]) -> torch.Tensor:
        """RegMean's merge of one tensor with the grams the engine collected (None: the weighted average)."""
        return RegMean.merge(self, name, tensors, grams=grams)

    def report(self) -> dict:
        return {"least_squares_fallback": list(self.fallbacks)}

    def merge(self, name, tensors, *, grams=None, base=None):
        raise ValueError("method 'regmean_pp' merges layer by layer and needs the experts' calibration data: "
                         "`mergeflow merge --method regmean_pp --calib FILE` (one per expert), or the merge stage of the pipeline")
