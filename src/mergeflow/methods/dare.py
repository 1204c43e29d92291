"""DARE: Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
Lunch (Yu et al., ICML 2024, https://arxiv.org/abs/2311.03099).

Drop And REscale: each expert's task vector `W_i - base` keeps each entry with probability
`density` (drops it with p = 1 - density) and, with `rescale`, is scaled back to its L1 norm
(mergekit's rescale; the paper divides by `density`, the same in expectation). The thinned task
vectors are then added with their weights (`dare_linear`), or merged as TIES does, electing each
entry's sign and keeping the agreeing entries (`dare_ties`); `normalize` divides by the sum of
the (agreeing) weights; `base + scaling * merged`.

Random: the mask of each tensor comes from a generator seeded by (`seed`, the tensor's name), so a
merge is reproducible byte for byte and independent of the order tensors are merged in. mergekit
draws from torch's global generator; with that seeded alike it keeps the same entries (tested).

mergekit mapping (`dare_linear`, `dare_ties`): `weight` -> `weights`, `lambda` -> `scaling`,
`density`, `normalize` (default false), `rescale` (default true) as named; mergekit's per-model
`density` must be one value here (per layer if need be); mergekit has no `seed`.
"""

from __future__ import annotations

from typing import Optional

from . import register
from .base import WEIGHTS
from .sparsify import SEED, Sparsifier, TaskVectorMethod, bernoulli, normalize_param, rescale_param, tensor_generator
from .task_arithmetic import SCALING
from .ties import DENSITY


@register
class DareLinear(TaskVectorMethod):
    name = "dare_linear"
    paper = "https://arxiv.org/abs/2311.03099"
    params = (WEIGHTS, SCALING, DENSITY, normalize_param(False), rescale_param(True), SEED)

    def sparsifier(self, name: str) -> Optional[Sparsifier]:
        density, rescale = self.value("density", name), self.value("rescale", name)
        generator = tensor_generator(self.value("seed", name), name)
        return lambda delta, i: bernoulli(delta, density, generator, rescale)


@register
class DareTies(DareLinear):
    name = "dare_ties"
    consensus = True
