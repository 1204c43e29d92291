"""Exact order statistics of a tensor streamed in blocks of rows: a two-pass radix select.

TIES, Model Breadcrumbs and SCE keep the entries of a task vector (or of a variance) at given
magnitude ranks of the whole tensor. Sorting the tensor needs it whole, and several copies of it;
here the tensor is read twice, block by block, and nothing larger than a histogram is kept:

- a non-negative float32's bits, read as an int32, order as the floats do, so |x| becomes an
  int32 key (`magnitude_keys`; `0x7FFFFFFF - key` orders them the other way round);
- pass 1 counts the keys' high 15 bits (32768 bins): the bin that holds the key of rank r;
- pass 2 counts the low 16 bits of the keys in that bin: the exact key of rank r, how many keys
  are smaller and how many equal it.

`Window` then picks the entries at ranks [start, stop) block by block, ties broken by position
as a stable sort breaks them (the earlier entry first), so the kept set is exactly the one
`torch.argsort(..., stable=True)` over the whole tensor gives, whatever the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

LOW_BITS = 16
HIGH_BINS = 1 << (31 - LOW_BITS)
LOW_BINS = 1 << LOW_BITS
LOW_MASK = LOW_BINS - 1
TOP_KEY = 0x7FFFFFFF


def magnitude_keys(x: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """int32 keys ordered as |x| (float32), or the other way round with `descending` (all >= 0)."""
    if x.dtype != torch.float32:
        raise TypeError(f"magnitude keys are made from float32 tensors, got {x.dtype}")
    keys = x.abs().view(torch.int32)
    return keys.neg_().add_(TOP_KEY) if descending else keys


@dataclass(frozen=True)
class Rank:
    """The key at one rank of the stream, how many keys are smaller (`less`) and equal (`count`)."""

    key: int
    less: int
    count: int


class RankSelect:
    """The keys at given ascending ranks (0-based) of a stream of non-negative int32 keys: `observe`
    every block (pass 0), `choose(ranks)`, `observe` every block again (pass 1), `finish()`."""

    def __init__(self) -> None:
        self.high = torch.zeros(HIGH_BINS, dtype=torch.int64)
        self.low: dict[int, torch.Tensor] = {}
        self.bins: dict[int, int] = {}

    def observe(self, step: int, keys: torch.Tensor) -> None:
        flat = keys.reshape(-1)
        top = flat >> LOW_BITS
        if step == 0:
            self.high += torch.bincount(top, minlength=HIGH_BINS)
            return
        for b, hist in self.low.items():
            hist += torch.bincount(flat[top == b] & LOW_MASK, minlength=LOW_BINS)

    def choose(self, ranks: list[int]) -> None:
        """After pass 0: the high bins that hold `ranks`, whose low bits pass 1 counts."""
        cumulative = self.high.cumsum(0)
        for r in ranks:
            b = int(torch.searchsorted(cumulative, r, right=True))
            self.bins[r] = b
            self.low.setdefault(b, torch.zeros(LOW_BINS, dtype=torch.int64))

    def finish(self) -> dict[int, Rank]:
        """After pass 1: rank -> its `Rank`."""
        cumulative = self.high.cumsum(0)
        out = {}
        for r, b in self.bins.items():
            below = int(cumulative[b - 1]) if b else 0
            low = self.low[b].cumsum(0)
            i = int(torch.searchsorted(low, r - below, right=True))
            out[r] = Rank(key=(b << LOW_BITS) | i, less=below + (int(low[i - 1]) if i else 0), count=int(self.low[b][i]))
        return out


class Window:
    """The entries of a stream of keys at ascending ranks [start, stop), ties broken by position
    (a stable sort's order); with `keep_ties`, every entry >= the key at rank `start` instead.

    Two passes (`observe` each block with step 0, `end_pass(0)`, again with step 1, `end_pass(1)`),
    then `mask` each block in stream order; `restart` before masking the stream once more.
    `stop` may be set up to `end_pass(0)` (SCE learns it in pass 0)."""

    passes = 2

    def __init__(self, numel: int, start: int, stop: Optional[int], keep_ties: bool = False):
        self.numel, self.start, self.stop, self.keep_ties = numel, max(0, start), stop, keep_ties
        self.select = RankSelect()
        self.lo: Optional[Rank] = None
        self.hi: Optional[Rank] = None
        self.seen: dict[int, int] = {}

    def ranks(self) -> list[int]:
        start, stop = self.start, min(self.numel, self.stop)
        if stop <= start:
            return []
        return ([start] if start > 0 else []) + ([stop - 1] if stop < self.numel and not self.keep_ties else [])

    def observe(self, step: int, keys: torch.Tensor) -> None:
        self.select.observe(step, keys)

    def end_pass(self, step: int) -> None:
        if step == 0:
            self.stop = min(self.numel, self.stop)
            self.select.choose(self.ranks())
            return
        found = self.select.finish()
        self.lo, self.hi = found.get(self.start) if self.start > 0 else None, found.get(self.stop - 1) if self.stop < self.numel else None
        self.restart()

    def restart(self) -> None:
        self.seen = {edge.key: 0 for edge in (self.lo, self.hi) if edge is not None}

    def mask(self, keys: torch.Tensor) -> torch.Tensor:
        """True on this block's entries in the window (blocks in stream order)."""
        if self.stop <= self.start:
            return torch.zeros(keys.shape, dtype=torch.bool)
        inside = torch.ones(keys.shape, dtype=torch.bool)
        if self.lo is not None:
            inside &= keys >= self.lo.key
        if self.hi is not None:
            inside &= keys <= self.hi.key
        if self.keep_ties:
            return inside
        for edge in {e.key: e for e in (self.lo, self.hi) if e is not None}.values():
            if self.start <= edge.less and edge.less + edge.count <= self.stop:
                continue  # all its equal entries are inside
            equal = keys == edge.key
            position = equal.reshape(-1).cumsum(0, dtype=torch.int32).reshape(keys.shape) + (edge.less + self.seen[edge.key] - 1)
            self.seen[edge.key] += int(equal.sum())
            inside &= ~equal | ((position >= self.start) & (position < self.stop))
        return inside


def ranked_mask(x: torch.Tensor, start: int, stop: int, *, descending: bool = False, keep_ties: bool = False) -> torch.Tensor:
    """`Window` over one whole float32 tensor of magnitudes: a bool mask of its ranks [start, stop)."""
    window = Window(x.numel(), start, stop, keep_ties)
    keys = magnitude_keys(x, descending)
    for step in range(window.passes):
        window.observe(step, keys)
        window.end_pass(step)
    return window.mask(keys)
