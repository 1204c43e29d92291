"""The streaming protocol's pieces: tensor-wide statistics gathered in passes over row blocks.

A method that needs numbers of the whole tensor (a norm, an angle, the k-th largest magnitude)
returns a `Statistics` from `statistics(name, shape)`; the engine reads the tensor's row blocks
`passes` times, in order, calling `observe(step, tensors, base)` on each block and
`end_pass(step)` after each pass, then merges the blocks in the same order with `stats=` that
object. Called on whole tensors (tests, a plugin engine), a method gathers its statistics on
them first (`gather`): one code path, whatever the blocks.

Sums over the tensor are accumulated in float64 over fixed chunks (`dot64`, `abs_sum64`), so they
depend on neither the thread count nor, beyond float64 rounding, on the blocks.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..determinism import lapack_one_thread as serial_reductions  # sparsify.serial_reductions: one thread when pinned

CHUNK = 1 << 16  # entries per float64 partial sum


class Statistics:
    """Tensor-wide numbers of one tensor, gathered block by block (see the module docstring)."""

    passes: int = 1

    def observe(self, step: int, tensors: Sequence[torch.Tensor], base: Optional[torch.Tensor]) -> None:
        """Take in one block of rows of every expert (and the base) in pass `step`."""

    def end_pass(self, step: int) -> None:
        """Called after every block went through pass `step`."""


def gather(stats: Optional[Statistics], tensors: Sequence[torch.Tensor], base: Optional[torch.Tensor]) -> Optional[Statistics]:
    """`stats` after its passes over whole tensors (one block); None stays None."""
    if stats is not None:
        for step in range(stats.passes):
            stats.observe(step, tensors, base)
            stats.end_pass(step)
    return stats


def dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """<a, b> over every entry, in float64 over chunks of CHUNK entries."""
    x, y = a.reshape(-1), b.reshape(-1)
    total = 0.0
    with serial_reductions():
        for s in range(0, x.numel(), CHUNK):
            total += float(torch.dot(x[s : s + CHUNK].double(), y[s : s + CHUNK].double()))
    return total


def abs_sum64(a: torch.Tensor) -> float:
    """sum |a| over every entry, in float64 over chunks of CHUNK entries."""
    x = a.reshape(-1)
    total = 0.0
    with serial_reductions():
        for s in range(0, x.numel(), CHUNK):
            total += float(x[s : s + CHUNK].double().abs_().sum())
    return total


class Products(Statistics):
    """The inner products <v_i, v_j> (i <= j) of the vectors a method derives from each block
    (`vectors`: the experts, or their task vectors), over the whole tensor, in float64."""

    def __init__(self) -> None:
        self.gram: Optional[torch.Tensor] = None

    def vectors(self, tensors: Sequence[torch.Tensor], base: Optional[torch.Tensor]) -> list[torch.Tensor]:
        return list(tensors)

    def observe(self, step: int, tensors: Sequence[torch.Tensor], base: Optional[torch.Tensor]) -> None:
        vs = self.vectors(tensors, base)
        if self.gram is None:
            self.gram = torch.zeros(len(vs), len(vs), dtype=torch.float64)
        for i, a in enumerate(vs):
            for j in range(i, len(vs)):
                self.gram[i, j] += dot64(a, vs[j])
                self.gram[j, i] = self.gram[i, j]
