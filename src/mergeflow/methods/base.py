"""The interface every merge method implements.

A method merges one tensor at a time: the engine streams each tensor of the experts (same name,
same shape, in the experts' order) and, for methods with `uses_grams`, the per-token mean gram of
each expert's Linear that owns the tensor. Adding a method is adding one small file with one
subclass decorated with `@register`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Optional, Sequence

import torch


class MergeMethod(ABC):
    """Merge the experts' versions of one tensor into one.

    Subclasses set `name` (the registry key, as in `--method NAME`) and implement `merge`.
    `grams`, when given, are `[in, in]` per-token MEAN grams, one per expert, already in the
    solver dtype; they are `None` for tensors that are not the weight of a Linear with grams.
    """

    name: ClassVar[str]
    uses_grams: ClassVar[bool] = False

    def __init__(self, *, alpha: float = 1.0, solver_dtype: torch.dtype = torch.float32):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha} (params.yaml: alpha, or --alpha)")
        self.alpha, self.solver_dtype = alpha, solver_dtype

    @abstractmethod
    def merge(self, name: str, tensors: Sequence[torch.Tensor], grams: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        """Return the merged tensor (any float dtype; the engine casts it to the experts' dtype)."""

    def config(self) -> dict:
        """The parameters that define this merge, saved beside the merged model."""
        return {"method": self.name, "alpha": self.alpha, "solver_dtype": str(self.solver_dtype).removeprefix("torch.")}
