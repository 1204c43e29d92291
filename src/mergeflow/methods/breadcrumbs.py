"""Model Breadcrumbs: task vectors without their outliers (Davari & Belilovsky, ECCV 2024).

"Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
https://arxiv.org/abs/2312.06795; mergekit's `breadcrumbs` and `breadcrumbs_ties`.

Each expert's task vector `W_i - base` drops its `gamma` fraction of largest magnitudes (outliers)
and keeps the next `density` fraction (fewer outliers are dropped where both do not fit);
`breadcrumbs` adds the weighted vectors, `breadcrumbs_ties` elects signs and keeps the agreeing
entries as TIES does; `normalize` divides by the sum of the (agreeing) weights, `rescale` scales
each thinned vector back to its L1 norm; `base + scaling * merged`. Counts are
`floor(fraction * entries)` per tensor, as in mergekit.

mergekit mapping (`breadcrumbs`, `breadcrumbs_ties`): `weight` -> `weights`, `lambda` ->
`scaling`, `density`, `gamma`, `normalize`, `rescale` (both default false) as named (one value for
all models, per layer if need be).
"""

from __future__ import annotations

from typing import Optional

from . import register
from .base import WEIGHTS
from .sparsify import GAMMA, NORMALIZE, RESCALE, Sparsifier, TaskVectorMethod, magnitude_outliers
from .task_arithmetic import SCALING
from .ties import DENSITY


@register
class Breadcrumbs(TaskVectorMethod):
    name = "breadcrumbs"
    paper = "https://arxiv.org/abs/2312.06795"
    params = (WEIGHTS, SCALING, DENSITY, GAMMA, NORMALIZE, RESCALE)

    def sparsifier(self, name: str) -> Optional[Sparsifier]:
        density, gamma, rescale = self.value("density", name), self.value("gamma", name), self.flag("rescale", name)
        return lambda delta, i: magnitude_outliers(delta, density, gamma, rescale)


@register
class BreadcrumbsTies(Breadcrumbs):
    name = "breadcrumbs_ties"
    consensus = True
