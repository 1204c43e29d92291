"""RegMean: Dataless Knowledge Fusion by Merging Weights of Language Models (Jin et al., ICLR 2023).

For a Linear with weights `W_i` (out x in) and per-token mean grams `G_i` of its inputs, the merged
weight minimises `sum_i w_i ||X_i W^T - X_i W_i^T||^2`, i.e. solves

    (sum_i w_i G~_i) W^T = sum_i w_i G~_i W_i^T,   G~_i = alpha * G_i + (1 - alpha) * diag(G_i)

(alpha shrinks the off-diagonals: 1 is full RegMean, 0 a diagonal-weighted average; the weights
`w_i` default to equal). The system is factored once per Linear by Cholesky, or solved by least
squares where it is not positive definite; every other tensor is (weighted-)averaged.

Memory: grams are loaded one at a time (an 8B model's down_proj gram is 14336^2 floats, 822 MB),
the left-hand side is built in place, and a tensor streamed in blocks of rows (`lm_head`) reuses
the factorisation for every block.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from ..determinism import lapack_one_thread
from . import register
from .base import GramLoader, MergeMethod, MergeOptions, weighted_sum

log = logging.getLogger(__name__)


@register
class RegMean(MergeMethod):
    name = "regmean"
    uses_grams = True
    reads = ("alpha", "weights", "solver_dtype")

    def __init__(self, options: MergeOptions = MergeOptions()):
        super().__init__(options)
        self.fell_back: list[str] = []
        self._factored: tuple[object, torch.Tensor, bool] | None = None  # (cache key, factor or lhs, is_cholesky)

    def config(self) -> dict:
        """As every method's, plus `regmean_bias` when it is not the default `average`."""
        out = super().config()
        if self.options.regmean_bias != "average":
            out["regmean_bias"] = self.options.regmean_bias
        return out

    def _factor(self, name: str, grams: Sequence[GramLoader], weights: list[float]) -> tuple[torch.Tensor, bool]:
        """Cholesky factor of `sum_i w_i G~_i` (or the matrix itself when not positive definite).

        Cached for the next call with the same grams: the row blocks of one tensor, and modules
        sharing one input (q/k/v, gate/up) when the loaders name their stored tensor (`key`).
        """
        keys = [getattr(load, "key", None) for load in grams]
        cache_key = (tuple(keys), tuple(weights)) if None not in keys else name
        if self._factored and self._factored[0] == cache_key:
            if not self._factored[2]:
                self.fell_back.append(name)
            return self._factored[1], self._factored[2]
        self._factored = None
        alpha, lhs = self.options.alpha, None
        for load, w in zip(grams, weights):
            g = load()
            diag = torch.diagonal(g).clone()
            g.mul_(alpha * w)
            torch.diagonal(g).add_(diag, alpha=(1.0 - alpha) * w)
            lhs = g if lhs is None else lhs.add_(g)
            del g
        with lapack_one_thread(lhs.device.type):  # bit-identical at any thread count (README "Reproducibility")
            chol, info = torch.linalg.cholesky_ex(lhs)
        if int(info) == 0:
            del lhs
            self._factored = (cache_key, chol, True)
        else:
            del chol
            self.fell_back.append(name)
            log.warning("%s: gram sum is not positive definite; solving by least squares", name)
            self._factored = (cache_key, lhs, False)
        return self._factored[1], self._factored[2]

    def merge(self, name: str, tensors: Sequence[torch.Tensor], *, grams: Optional[Sequence[GramLoader]] = None, base: Optional[torch.Tensor] = None) -> torch.Tensor:
        weights = self.expert_weights(len(tensors), normalise=True)
        if grams is None:
            return weighted_sum(tensors, weights)
        dtype, device, alpha = self.options.solver_dtype, self.options.device, self.options.alpha
        factor, is_cholesky = self._factor(name, grams, weights)
        # With A = sum_i w_i G~_i:  sum_i w_i G~_i W_i^T = A R^T + sum_i w_i G~_i (W_i - R)^T for any R,
        # so W = R + (A^-1 sum_i w_i G~_i (W_i - R)^T)^T. R = the last expert drops one [in x in] @
        # [in x rows] product (a third of the work for two experts); where A is singular, R = the
        # average keeps never-seen input directions averaged.
        if is_cholesky:
            ref = tensors[-1].to(device=device, dtype=dtype, copy=True)  # returned, so never the caller's tensor
            terms = list(zip(grams[:-1], weights[:-1], tensors[:-1]))
        else:
            ref = weighted_sum(tensors, weights).to(device=device, dtype=dtype)
            terms = list(zip(grams, weights, tensors))
        rhs = torch.zeros(ref.shape[1], ref.shape[0], dtype=dtype, device=device)
        for load, w, t in terms:
            g = load()
            delta = (t.to(device=device, dtype=dtype) - ref).T  # [in, rows]
            rhs.add_(g @ delta, alpha=alpha * w)  # alpha G dW^T + (1 - alpha) diag(G) dW^T, without forming G~
            rhs.addcmul_(torch.diagonal(g)[:, None], delta, value=(1.0 - alpha) * w)
            del g, delta
        if is_cholesky:  # two triangular solves: the same as cholesky_solve, and faster on CPU
            lower = torch.linalg.solve_triangular(factor, rhs, upper=False)
            solution = torch.linalg.solve_triangular(factor.mT, lower, upper=True)
            del lower
        else:  # rank-deficient: gelsd (SVD) exists on the CPU only; CUDA's gels assumes full rank
            with lapack_one_thread():
                solution = torch.linalg.lstsq(factor.cpu(), rhs.cpu(), driver="gelsd").solution.to(device)
        if log.isEnabledFor(logging.DEBUG):
            lhs = factor @ factor.T if is_cholesky else factor
            residual = torch.linalg.matrix_norm(lhs @ solution - rhs) / torch.linalg.matrix_norm(rhs).clamp_min(1e-30)
            log.debug("%s: relative residual %.3e", name, float(residual))
        return ref.add_(solution.T).cpu()
