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
"""

from __future__ import annotations

import zlib
from typing import Callable, ClassVar, Optional, Sequence

import torch

from ..determinism import lapack_one_thread
from .base import GramLoader, MergeMethod, Param

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
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[torch.argsort(delta.abs().reshape(-1), descending=True, stable=True)[:k]] = 1
    return rescale_l1(delta, mask.reshape_as(delta), rescale)


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    """Model Breadcrumbs: drop the `floor(gamma * numel)` largest magnitudes (outliers), then keep
    the next `floor(density * numel)` (fewer outliers dropped where both do not fit)."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    mask = torch.zeros(n, dtype=delta.dtype)
    mask[torch.argsort(delta.abs().reshape(-1), stable=True)[bottom : bottom + keep]] = 1
    return rescale_l1(delta, mask.reshape_as(delta), rescale)


def bernoulli(delta: torch.Tensor, density: float, generator: torch.Generator, rescale: bool = True) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, independently."""
    if density >= 1:
        return delta
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return rescale_l1(delta, mask, rescale)


def della_magprune(delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator, rescale: bool = True) -> torch.Tensor:
    """DELLA's MagPrune: within each row, keep an entry with a probability rising linearly with its
    magnitude rank from `density - epsilon` (smallest) to `density + epsilon` (largest)."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"della: density +/- epsilon must lie in (0, 1), got density {density} and epsilon {epsilon}")
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).to(torch.float32) + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    # a row of one entry has no ranks to spread: it is kept with probability `density`
    spread = torch.where(hi > lo, (ranks - lo) / (hi - lo).clamp_min(1), torch.full_like(ranks, 0.5)).clamp(0, 1)
    mask = torch.bernoulli((density - epsilon) + spread * 2 * epsilon, generator=generator)
    return rescale_l1(rows, mask, rescale).reshape(delta.shape)


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
    row_separable = False  # ranks and random masks cover the whole tensor
    consensus: ClassVar[bool] = False
    default_normalize: ClassVar[bool] = False
    default_rescale: ClassVar[bool] = False

    def flag(self, name: str, tensor: str) -> bool:
        """`normalize` or `rescale` for `tensor`: as given, else this method's default."""
        value = self.value(name, tensor)
        return getattr(self, f"default_{name}") if value is None else value

    def sparsifier(self, name: str) -> Optional[Sparsifier]:
        """How each expert's task vector of tensor `name` is thinned (None: not at all)."""
        return None

    def merge(self, name: str, tensors: Sequence[torch.Tensor], *, grams: Optional[Sequence[GramLoader]] = None, base: Optional[torch.Tensor] = None) -> torch.Tensor:
        weights = self.expert_weights(name, len(tensors), normalise=False)
        return merge_task_vectors(
            base, tensors, weights, sparsify=self.sparsifier(name), consensus=self.consensus,
            normalize=self.flag("normalize", name), scaling=self.value("scaling", name),
        )
