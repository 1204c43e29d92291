"""Solved tensors that cannot go to a merge method as they are stored.

- A transformers `Conv1D` (GPT-2) stores its weight `[in, out]`: the method gets it as `[out, in]`
  (what RegMean's normal equations and the gram `[in, in]` expect) and the result is turned back.
- With `bias="solve"`, a Linear's weight and bias are one least-squares fit: the method gets
  `[W | b]` (`[out, in + 1]`) against the grams of the inputs augmented by a constant 1,
  `[[G, m], [m^T, 1]]` (`GramDir.load_mean_augmented`), so RegMean's own closed form is the exact
  least-squares solution with a bias column (alpha = 1; alpha < 1 shrinks the augmented gram's
  off-diagonals, the mean included, like any other). The weight and the bias come out of one
  solve: the first of the two tensors the engine asks for computes both, the second is kept until
  asked for.

Such tensors are merged whole (never in row blocks); they are a block's projections, not the
embeddings that blocks exist for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .format import GramRef

BIAS_MODES = ("average", "solve")


def augment(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`[W | b]`: the weight `[out, in]` with the bias as one more input column."""
    return torch.cat([weight, bias.to(weight.dtype)[:, None]], dim=1)


@dataclass
class JointSolve:
    """The engine's side of Conv1D orientation and bias solving (see the module docstring).

    `refs`: solved module -> its gram record; `biased`: the solved modules whose bias is fitted.
    """

    refs: dict[str, GramRef]
    biased: set[str]
    _kept: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def plan(cls, refs: dict[str, GramRef], tensor_names: Sequence[str], bias: str) -> "JointSolve":
        if bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
        names = set(tensor_names)
        biased = {m for m in refs if f"{m}.bias" in names} if bias == "solve" else set()
        return cls({m: r for m, r in refs.items() if r.transposed or m in biased}, biased)

    def module_of(self, tensor: str) -> Optional[str]:
        """The module whose weight (or solved bias) `tensor` is, when it goes through here."""
        module, _, kind = tensor.rpartition(".")
        if module in self.refs and (kind == "weight" or (kind == "bias" and module in self.biased)):
            return module
        return None

    def merge(self, tensor: str, merge: Callable, read: Callable[[str], list], read_base: Callable[[str], Optional[torch.Tensor]], loaders: Callable[[str, bool], list]) -> torch.Tensor:
        """The merged `tensor` (as stored). `merge(name, tensors, grams, base)` is the method's;
        `read(name)` the experts' tensors; `loaders(module, augmented)` their gram loaders."""
        if tensor in self._kept:
            return self._kept.pop(tensor)
        module = self.module_of(tensor)
        ref = self.refs[module]
        weight = f"{module}.weight"

        def oriented(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else (t.T if ref.transposed else t)

        tensors = [oriented(t) for t in read(weight)]
        base = oriented(read_base(weight))
        if module not in self.biased:
            merged = merge(weight, tensors, loaders(module, False), base)
            return merged.T.contiguous() if ref.transposed else merged
        bias = f"{module}.bias"
        tensors = [augment(w, b) for w, b in zip(tensors, read(bias))]
        base_bias = read_base(bias)
        base = augment(base, base_bias) if base is not None and base_bias is not None else None
        merged = merge(weight, tensors, loaders(module, True), base)
        w, b = merged[:, :-1], merged[:, -1].contiguous()
        w = w.T.contiguous() if ref.transposed else w.contiguous()
        self._kept[bias if tensor == weight else weight] = b if tensor == weight else w
        return w if tensor == weight else b
