"""Task-vector sparsification and sign consensus, shared by TIES (mergekit convention), DARE,
DELLA and Model Breadcrumbs.

These are mergekit 0.1.5's "generalized task arithmetic" (`mergekit/sparsify.py` and
`merge_methods/generalized_task_arithmetic.py`), reimplemented on float32 tensors so that each
method file only picks its sparsifier, whether it elects signs, and its defaults:

    delta_i = sparsify(W_i - base)            (per expert, before its weight)
    delta_i = w_i * delta_i
    mask    = sign(delta_i) == elected sign   (consensus methods; + where the sum is >= 0)
    merged  = sum_i mask * delta_i  [ / sum_i w_i mask   (normalize) ]
    out     = base + scaling * merged

`rescale` multiplies a sparsified task vector by ||delta||_1 / ||sparsified||_1 (mergekit's
choice; DARE's and DELLA's papers divide each kept entry by its keep probability instead, the
same in expectation). Random sparsifiers draw from the `torch.Generator` they are given, in
exactly mergekit's calls, so that with a generator seeded like torch's global one they keep
the same entries as mergekit does (the tests rely on this).

The engine streams these methods in row blocks (`MergeMethod.statistics`): each sparsifier is a
`Thinning`, which finds what it needs of the whole tensor in passes over the blocks first (exact
magnitude ranks, `RankThinning`; the generator states of each expert's draw, `RandomThinning`;
the L1 norms for `rescale`, in float64) and then thins each block as the whole tensor would be:
the same entries kept, the rescale factor equal to float rounding. `magnitude`,
`magnitude_outliers`, `bernoulli` and `della_magprune` do the same on one whole tensor.
"""

from __future__ import annotations

import zlib
from typing import Callable, ClassVar, Optional, Sequence

import torch

from ..determinism import lapack_one_thread
from .base import GramLoader, MergeMethod, Param
from .select import Window, magnitude_keys, ranked_mask
from .streaming import CHUNK, Statistics, abs_sum64, gather

#: thins one float32 task vector; given the expert's index, returns a new tensor
Sparsifier = Callable[[torch.Tensor, int], torch.Tensor]

#: ATen splits a reduction to one number (a norm, a dot, a sum) by thread count, so its last bit
#: changes with the thread count; under this (one thread when the kernels are pinned, as LAPACK)
#: the data-free methods' outputs stay bit-identical (README "Reproducibility").
serial_reductions = lapack_one_thread


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded with the CRC-32 of the tensor name started from `seed`: a tensor's
    draws depend on neither the order in which tensors are merged nor the thread count. (torch's
    CPU generator keeps only the low 32 bits of a seed, so the two are mixed, not concatenated.)"""
    return torch.Generator().manual_seed(zlib.crc32(name.encode(), int(seed) & 0xFFFFFFFF))


def rescale_l1(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool, eps: float = 1e-7) -> torch.Tensor:
    """`tensor * mask`, times ||tensor||_1 / ||tensor * mask||_1 with `rescale` (unless either is ~0)."""
    masked = tensor * mask
    if not rescale:
        return masked
    with serial_reductions():
        before, after = tensor.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def magnitude(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the `max(1, floor(density * numel))` largest magnitudes (TIES as mergekit does it)."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    return rescale_l1(delta, ranked_mask(delta, 0, k, descending=True), rescale)


def outlier_window(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """Model Breadcrumbs' kept ascending magnitude ranks [start, stop): `floor(gamma * numel)`
    largest dropped, then the next `floor(density * numel)` kept (fewer dropped where both do not fit)."""
    keep, top = int(density * numel), int(gamma * numel)
    bottom = max(0, numel - keep - top)
    return bottom, bottom + keep


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    """Model Breadcrumbs on a whole tensor (`outlier_window`)."""
    if density >= 1:
        return delta
    return rescale_l1(delta, ranked_mask(delta, *outlier_window(delta.numel(), density, gamma)), rescale)


def bernoulli(delta: torch.Tensor, density: float, generator: torch.Generator, rescale: bool = True) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, independently."""
    if density >= 1:
        return delta
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return rescale_l1(delta, mask, rescale)


def check_band(density: float, epsilon: float) -> None:
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"della: density +/- epsilon must lie in (0, 1), got density {density} and epsilon {epsilon}")


def della_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probabilities, rising within each row (a 1-D tensor: one row) linearly with the
    magnitude rank from `density - epsilon` (smallest) to `density + epsilon` (largest)."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).to(torch.float32) + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    # a row of one entry has no ranks to spread: it is kept with probability `density`
    spread = torch.where(hi > lo, (ranks - lo) / (hi - lo).clamp_min(1), torch.full_like(ranks, 0.5)).clamp(0, 1)
    return ((density - epsilon) + spread * 2 * epsilon).reshape(delta.shape)


def della_magprune(delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator, rescale: bool = True) -> torch.Tensor:
    """DELLA's MagPrune on a whole tensor (`della_probabilities`)."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    check_band(density, epsilon)
    mask = torch.bernoulli(della_probabilities(delta, density, epsilon), generator=generator)
    return rescale_l1(delta, mask, rescale)


def sign_consensus(deltas: torch.Tensor) -> torch.Tensor:
    """TIES's sign election over the stacked, weighted task vectors: True where an entry's sign is
    the sign of the sum (+ where the sum is >= 0, so exact ties elect +; zeros never agree)."""
    elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0)
    return deltas.sign() == elected


def merge_task_vectors(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sparsify: Optional[Sparsifier] = None,
    consensus: bool = False,
    normalize: bool = False,
    scaling: float = 1.0,
) -> torch.Tensor:
    """mergekit's generalized task arithmetic, in float32 (see the module docstring)."""
    base32 = base.to(torch.float32)
    deltas = torch.empty((len(tensors), *base.shape), dtype=torch.float32)
    for i, t in enumerate(tensors):
        delta = t.to(torch.float32) - base32
        deltas[i] = sparsify(delta, i) if sparsify is not None else delta
        del delta
    w = torch.tensor(list(weights), dtype=torch.float32).reshape(-1, *([1] * base.dim()))
    deltas.mul_(w)
    if consensus:
        mask = sign_consensus(deltas)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
        merged = deltas.mul_(mask).sum(dim=0)  # in place: one stack of task vectors in memory, not two
        del mask
    else:
        merged = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    del deltas
    if normalize:
        merged /= divisor
    if scaling != 1:
        merged *= scaling
    return base32 + merged


class Thinning(Statistics):
    """Each expert's thinned task vector `W_i - base`, block by block, in stream order (`thin`, a
    `Sparsifier`): subclasses say which entries a block keeps (`mask`) and how many passes over
    the blocks they need first (`select_passes`); with `rescale`, one more pass sums the L1 norms
    of each task vector and of its kept entries (float64), for the factor back to the first."""

    select_passes: ClassVar[int] = 0

    def __init__(self, rescale: bool, eps: float = 1e-7):
        self.rescale, self.eps = rescale, eps
        self.passes = self.select_passes + int(rescale)
        self.norms: dict[int, list[float]] = {}  # expert -> [|delta|_1, |delta * mask|_1]
        self.factors: dict[int, torch.Tensor] = {}

    def observe_delta(self, step: int, i: int, delta: torch.Tensor) -> None:
        """Selection pass `step` over expert `i`'s block of task vector."""

    def end_select(self, step: int) -> None:
        """After selection pass `step`."""

    def restart(self) -> None:
        """Before masking the blocks from the first one again."""

    def mask(self, i: int, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def observe(self, step: int, tensors: Sequence[torch.Tensor], base: Optional[torch.Tensor]) -> None:
        base32 = base.to(torch.float32)
        for i, t in enumerate(tensors):
            delta = t.to(torch.float32) - base32
            if step < self.select_passes:
                self.observe_delta(step, i, delta)
                continue
            norms = self.norms.setdefault(i, [0.0, 0.0])
            norms[0] += abs_sum64(delta)
            norms[1] += abs_sum64(delta.mul_(self.mask(i, delta)))

    def end_pass(self, step: int) -> None:
        if step < self.select_passes:
            self.end_select(step)
        else:
            self.factors = {i: torch.tensor(before / after, dtype=torch.float32) for i, (before, after) in self.norms.items() if before >= self.eps and after >= self.eps}
        self.restart()

    def thin(self, delta: torch.Tensor, i: int) -> torch.Tensor:
        masked = delta * self.mask(i, delta)
        return masked * self.factors[i] if i in self.factors else masked


class RankThinning(Thinning):
    """Keeps, of each expert's task vector, the entries at magnitude ranks [start, stop) of the
    whole tensor (ascending, or `descending`), ties broken by position (select.Window)."""

    select_passes = 2

    def __init__(self, numel: int, window: tuple[int, int], *, descending: bool = False, rescale: bool = False):
        super().__init__(rescale)
        self.numel, self.window, self.descending = numel, window, descending
        self.windows: dict[int, Window] = {}

    def observe_delta(self, step: int, i: int, delta: torch.Tensor) -> None:
        self.windows.setdefault(i, Window(self.numel, *self.window)).observe(step, magnitude_keys(delta, self.descending))

    def end_select(self, step: int) -> None:
        for w in self.windows.values():
            w.end_pass(step)

    def restart(self) -> None:
        for w in self.windows.values():
            w.restart()

    def mask(self, i: int, delta: torch.Tensor) -> torch.Tensor:
        return self.windows[i].mask(magnitude_keys(delta, self.descending))


class RandomThinning(Thinning):
    """Keeps each entry with its probability (`probabilities` of the block), drawn from `generator`
    as one draw over the whole tensor, expert after expert, would (mergekit's order): expert i's
    blocks draw from the generator's state after i tensors' worth of draws, however the tensor is
    cut into blocks (the CPU kernel draws one number per entry, in order)."""

    def __init__(self, generator: torch.Generator, numel: int, probabilities: Callable[[torch.Tensor], torch.Tensor], *, rescale: bool):
        super().__init__(rescale)
        self.states, self.numel, self.probabilities = [generator.get_state()], numel, probabilities
        self.generators: dict[int, torch.Generator] = {}

    def restart(self) -> None:
        self.generators = {}

    def generator(self, i: int) -> torch.Generator:
        while len(self.states) <= i:
            g = torch.Generator().set_state(self.states[-1])
            for start in range(0, self.numel, CHUNK):
                torch.bernoulli(torch.full((min(CHUNK, self.numel - start),), 0.5), generator=g)
            self.states.append(g.get_state())
        if i not in self.generators:
            self.generators[i] = torch.Generator().set_state(self.states[i])
        return self.generators[i]

    def mask(self, i: int, delta: torch.Tensor) -> torch.Tensor:
        return torch.bernoulli(self.probabilities(delta), generator=self.generator(i))


SEED = Param("seed", int, 0, "random seed; each tensor draws from (seed, its name), in any merge order", low=0, high=2**32 - 1, per_layer=False)
GAMMA = Param("gamma", float, 0.01, "fraction of each task vector's largest magnitudes dropped as outliers", low=0.0, high=1.0)
EPSILON = Param("epsilon", float, 0.15, "keep probabilities run from density - epsilon to density + epsilon", low=0.0, high=1.0, high_open=True)


# One default per param name (one params.yaml key): null stands for each method's own, mergekit's
NORMALIZE = Param("normalize", bool, None, "divide the merged task vector by the sum of the (agreeing) experts' weights; null: the method's default (della: true, the others: false)", per_layer=False)
RESCALE = Param("rescale", bool, None, "scale each sparsified task vector back to its L1 norm; null: the method's default (dare, della: true, breadcrumbs: false)", per_layer=False)


class TaskVectorMethod(MergeMethod):
    """mergekit's generalized task arithmetic: subclasses pick `sparsifier`, `consensus` and the
    defaults of `normalize` and `rescale`, and declare `params` (`weights`, `scaling`,
    `normalize`, and what their sparsifier reads)."""

    uses_base = True
    row_separable = False  # ranks and random masks cover the whole tensor: streamed with `thinning`
    consensus: ClassVar[bool] = False
    default_normalize: ClassVar[bool] = False
    default_rescale: ClassVar[bool] = False

    def flag(self, name: str, tensor: str) -> bool:
        """`normalize` or `rescale` for `tensor`: as given, else this method's default."""
        value = self.value(name, tensor)
        return getattr(self, f"default_{name}") if value is None else value

    def thinning(self, name: str, shape: tuple[int, ...]) -> Optional[Thinning]:
        """How each expert's task vector of tensor `name` is thinned (None: not at all)."""
        return None

    def block_copies(self, inputs: int) -> int:
        return 2 * inputs + 6  # the task vectors, their signs, masks and sums, the output

    def statistics(self, name: str, shape: tuple[int, ...]) -> Optional[Thinning]:
        return self.thinning(name, shape)

    def merge(self, name: str, tensors: Sequence[torch.Tensor], *, grams: Optional[Sequence[GramLoader]] = None, base: Optional[torch.Tensor] = None,
              stats: Optional[Thinning] = None) -> torch.Tensor:
        weights = self.expert_weights(name, len(tensors), normalise=False)
        stats = stats or gather(self.statistics(name, tuple(base.shape)), tensors, base)
        return merge_task_vectors(
            base, tensors, weights, sparsify=stats.thin if stats is not None else None, consensus=self.consensus,
            normalize=self.flag("normalize", name), scaling=self.value("scaling", name),
        )
