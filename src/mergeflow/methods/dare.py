"""DARE: drop and rescale task vectors at random (Yu et al., ICML 2024): dare_linear, dare_ties.

"Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch",
https://arxiv.org/abs/2311.03099; mergekit's `dare_linear` and `dare_ties`.

Drop And REscale: each expert's task vector `W_i - base` keeps each entry with probability
`density` (drops it with p = 1 - density) and, with `rescale`, is scaled back to its L1 norm
(mergekit's rescale; the paper divides by `density`, the same in expectation). The thinned task
vectors are then added with their weights (`dare_linear`), or merged as TIES does, electing each
entry's sign and keeping the agreeing entries (`dare_ties`); `normalize` divides by the sum of
the (agreeing) weights; `base + scaling * merged`.

Random: the mask of each tensor comes from a generator seeded by (`seed`, the tensor's name), so a
merge is reproducible byte for byte and independent of the order tensors are merged in, and of
the row blocks the engine streams it in (`sparsify.RandomThinning`). mergekit
draws from torch's global generator; with that seeded alike it keeps the same entries (tested).

mergekit mapping (`dare_linear`, `dare_ties`): `weight` -> `weights`, `lambda` -> `scaling`,
`density`, `normalize`, `rescale` as named (null, as params.yaml ships them: mergekit's defaults,
normalize false, rescale true); mergekit's per-model `density` must be one value here (per layer
if need be); mergekit has no `seed`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import register
from .base import WEIGHTS
from .sparsify import NORMALIZE, RESCALE, SEED, RandomThinning, TaskVectorMethod, Thinning, tensor_generator
from .task_arithmetic import SCALING
from .ties import DENSITY


@register
class DareLinear(TaskVectorMethod):
    name = "dare_linear"
    paper = "https://arxiv.org/abs/2311.03099"
    params = (WEIGHTS, SCALING, DENSITY, NORMALIZE, RESCALE, SEED)
    default_rescale = True

    def thinning(self, name: str, shape: tuple[int, ...]) -> Optional[Thinning]:
        density = self.value("density", name)
        if density >= 1:
            return None
        generator = tensor_generator(self.value("seed", name), name)
        return RandomThinning(generator, math.prod(shape), lambda delta: torch.full_like(delta, density), rescale=self.flag("rescale", name))


@register
class DareTies(DareLinear):
    name = "dare_ties"
    consensus = True
