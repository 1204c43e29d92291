"""Model Breadcrumbs: task vectors without their outliers (Davari & Belilovsky, ECCV 2024).

"Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
https://arxiv.org/abs/2312.06795; mergekit's `breadcrumbs` and `breadcrumbs_ties`.

Each expert's task vector `W_i - base` drops its `gamma` fraction of largest magnitudes (outliers)
and keeps the next `density` fraction (fewer outliers are dropped where both do not fit);
`breadcrumbs` adds the weighted vectors, `breadcrumbs_ties` elects signs and keeps the agreeing
entries as TIES does; `normalize` divides by the sum of the (agreeing) weights, `rescale` scales
each thinned vector back to its L1 norm; `base + scaling * merged`. Counts are
`floor(fraction * entries)` per tensor, as in mergekit; the ranks are exact over the whole tensor,
found in two passes over its row blocks (`select.py`).

mergekit mapping (`breadcrumbs`, `breadcrumbs_ties`): `weight` -> `weights`, `lambda` ->
`scaling`, `density`, `gamma`, `normalize`, `rescale` (both default false) as named (one value for
all models, per layer if need be).
"""

from __future__ import annotations

import math
from typing import Optional

from . import register
from .base import WEIGHTS
from .sparsify import GAMMA, NORMALIZE, RESCALE, RankThinning, TaskVectorMethod, Thinning, outlier_window
from .task_arithmetic import SCALING
from .ties import DENSITY


@register
class Breadcrumbs(TaskVectorMethod):
    name = "breadcrumbs"
    paper = "https://arxiv.org/abs/2312.06795"
    params = (WEIGHTS, SCALING, DENSITY, GAMMA, NORMALIZE, RESCALE)

    def thinning(self, name: str, shape: tuple[int, ...]) -> Optional[Thinning]:
        density = self.value("density", name)
        if density >= 1:
            return None
        numel = math.prod(shape)
        return RankThinning(numel, outlier_window(numel, density, self.value("gamma", name)), rescale=self.flag("rescale", name))


@register
class BreadcrumbsTies(Breadcrumbs):
    name = "breadcrumbs_ties"
    consensus = True
