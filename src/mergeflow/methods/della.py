"""DELLA: task vectors sampled by magnitude rank (Deep et al., 2024): della, della_linear.

"DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling",
https://arxiv.org/abs/2406.11617; mergekit's `della` and `della_linear`.

MagPrune: within each row of each expert's task vector `W_i - base`, entries are ranked by
magnitude and kept with a probability rising linearly from `density - epsilon` (smallest) to
`density + epsilon` (largest); with `rescale` the thinned vector is scaled back to its L1 norm
(mergekit's rescale; the paper divides each entry by its keep probability). `della` then elects
signs and keeps the agreeing entries as TIES does and, with `normalize` (default true), divides by
the agreeing weights; `della_linear` adds the weighted vectors. `base + scaling * merged`.
`density +/- epsilon` must lie in (0, 1).

Random: the mask of each tensor comes from a generator seeded by (`seed`, the tensor's name), so a
merge is reproducible byte for byte and independent of merge order; with torch's global generator
seeded alike, mergekit keeps the same entries (tested).

mergekit mapping (`della`, `della_linear`): `weight` -> `weights`, `lambda` -> `scaling`,
`density`, `epsilon`, `normalize`, `rescale` as named (one value for all models, per layer if
need be); mergekit has no `seed`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from . import register
from .base import WEIGHTS, ParamError
from .sparsify import EPSILON, NORMALIZE, RESCALE, SEED, RandomThinning, TaskVectorMethod, Thinning, check_band, della_probabilities, tensor_generator
from .task_arithmetic import SCALING
from .ties import DENSITY


@register
class Della(TaskVectorMethod):
    name = "della"
    paper = "https://arxiv.org/abs/2406.11617"
    params = (WEIGHTS, SCALING, DENSITY, EPSILON, NORMALIZE, RESCALE, SEED)
    consensus = True
    default_normalize = True
    default_rescale = True

    def prepare(self, tensor_names: Sequence[str], *, num_experts: Optional[int] = None, device: str = "cpu") -> None:
        """Refuse, before the first tensor, a (per-layer) density and epsilon whose band leaves (0, 1)."""
        super().prepare(tensor_names, num_experts=num_experts, device=device)
        for name in tensor_names:
            density, epsilon = self.value("density", name), self.value("epsilon", name)
            if density < 1 and not 0 < density - epsilon < density + epsilon < 1:
                raise ParamError(f"{self.name}: density +/- epsilon must lie in (0, 1), got density {density:g} and epsilon {epsilon:g} for {name}", "epsilon")

    def block_copies(self, inputs: int) -> int:
        return 2 * inputs + 14  # the task vectors' stack and sums, and per block two argsorts (int64) of magnitudes

    def thinning(self, name: str, shape: tuple[int, ...]) -> Optional[Thinning]:
        density, epsilon = self.value("density", name), self.value("epsilon", name)
        if density >= 1:
            return None
        check_band(density, epsilon)
        generator = tensor_generator(self.value("seed", name), name)
        probabilities = lambda delta: della_probabilities(delta, density, epsilon)  # noqa: E731  (ranks within rows: any row blocks)
        return RandomThinning(generator, math.prod(shape), probabilities, rescale=self.flag("rescale", name))


@register
class DellaLinear(Della):
    name = "della_linear"
    consensus = False
    default_normalize = False
