"""The interface every merge method implements.

A method merges one tensor at a time. The engine streams each tensor of the experts (same name,
same shape, in the experts' order) and, when the method asks for them, the base model's tensor
(`uses_base`) and lazy loaders of the per-token mean grams of the Linear that owns the tensor
(`uses_grams`). A `row_separable` method computes each output row from the same rows of its
inputs, so the engine may hand it a huge tensor (a 128256-row embedding) one block of rows at a
time; other methods always get whole tensors.

Adding a method is one small file with one subclass decorated with `@register`, or a file of
your own passed as `method: path/to/file.py:ClassName` (see `methods/__init__.py`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Callable, ClassVar, Optional, Sequence

import torch

from ..params import field_default

GramLoader = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class MergeOptions:
    """Every knob a built-in method reads; a method uses the ones it needs.

    alpha: RegMean's scale of the grams' off-diagonals, in [0, 1].
    weights: one weight per expert (average and RegMean normalise them to sum 1; task
        arithmetic and TIES use them as given); None means equal weights.
    scaling: task arithmetic and TIES: lambda, the factor on the merged task vector.
    density: TIES: the fraction of each task vector's entries kept (largest magnitudes).
    solver_dtype, device: where and in what precision RegMean solves; device `auto` is CUDA
        when a GPU is visible (CUDA_VISIBLE_DEVICES decides which), else the CPU.
    """

    alpha: float = field_default("alpha")[0]  # defaults: params.py's, as params.yaml and the CLI
    weights: Optional[tuple[float, ...]] = None
    scaling: float = field_default("merge.scaling")[0]
    density: float = field_default("merge.density")[0]
    solver_dtype: torch.dtype = getattr(torch, field_default("merge.solver_dtype")[0])
    device: str = field_default("merge.device")[0]
    regmean_bias: str = field_default("merge.regmean_bias")[0]  # average | solve (grams/solve.py)

    def __post_init__(self):
        if self.device == "auto":
            object.__setattr__(self, "device", "cuda" if torch.cuda.is_available() else "cpu")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha} (params.yaml: alpha, or --alpha)")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density} (params.yaml: merge.density, or --density)")
        if self.weights is not None and (any(w < 0 for w in self.weights) or sum(self.weights) <= 0):
            raise ValueError(f"weights must be non-negative with a positive sum, got {list(self.weights)} (params.yaml: merge.weights)")


class MergeMethod(ABC):
    """Merge the experts' versions of one tensor (or one block of its rows) into one.

    Subclasses set `name` (the registry key, as in `--method NAME`) and implement `merge`.
    """

    name: ClassVar[str]
    uses_grams: ClassVar[bool] = False
    uses_base: ClassVar[bool] = False
    row_separable: ClassVar[bool] = True
    #: the MergeOptions fields that define this method's result, saved beside the merged model
    reads: ClassVar[tuple[str, ...]] = ("weights",)

    def __init__(self, options: MergeOptions = MergeOptions()):
        self.options = options

    def expert_weights(self, n: int, *, normalise: bool) -> list[float]:
        weights = list(self.options.weights) if self.options.weights is not None else [1.0] * n
        if len(weights) != n:
            raise ValueError(f"{len(weights)} weights for {n} experts (params.yaml: merge.weights)")
        total = sum(weights)
        return [w / total for w in weights] if normalise else weights

    @abstractmethod
    def merge(
        self,
        name: str,
        tensors: Sequence[torch.Tensor],
        *,
        grams: Optional[Sequence[GramLoader]] = None,
        base: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Return the merged tensor (any float dtype; the engine casts it to the experts' dtype).

        `grams`, for methods with `uses_grams` and tensors that are the weight of a Linear with
        grams, are zero-argument callables, one per expert, each returning that expert's
        `[in, in]` per-token mean gram in the solver dtype on the solver device, as a new tensor
        on every call (methods may modify it in place); otherwise None.
        `base` is the base model's tensor (same rows) for methods with `uses_base`.
        """

    def config(self) -> dict:
        """The parameters that define this merge, saved beside the merged model."""
        values = asdict(self.options)
        out = {"method": self.name}
        for key in self.reads:
            value = values[key]
            out[key] = str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else (list(value) if isinstance(value, tuple) else value)
        return out


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """`sum_i w_i t_i` in float32, as a new tensor."""
    out = tensors[0].to(torch.float32).mul(weights[0])
    for t, w in zip(tensors[1:], weights[1:]):
        out.add_(t.to(torch.float32), alpha=w)
    return out
