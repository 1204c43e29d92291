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
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from ..determinism import lapack_one_thread
from . import register
from .base import WEIGHTS, GramHandle, GramLoader, MergeMethod, Param, weighted_sum

if TYPE_CHECKING:
    from ..checkpoint import CheckpointReader
    from ..grams import GramDir

log = logging.getLogger(__name__)
LM_HEAD = "lm_head"
ALPHA = Param("alpha", float, 0.1, "scale of the grams' off-diagonals (1: full RegMean, 0: a diagonal-weighted average)", low=0.0, high=1.0)
SOLVER_DTYPE = Param("solver_dtype", str, "float32", "precision of the linear solves", choices=("float32", "float64"), per_layer=False)


def solved_modules(grams: Sequence["GramDir"], model: "CheckpointReader", *, lm_head: bool) -> list[str]:
    """The Linears RegMean solves: every block Linear with grams, plus `lm_head` when asked for.

    `lm_head` needs grams of its own and is never solved when tied to the input embeddings (the
    merged model's embeddings would no longer equal its output layer).
    """
    from ..merge import is_tied  # the engine's config.json reader (the engine imports the methods first)

    modules = set(grams[0].modules)
    for g in grams[1:]:
        if set(g.modules) != modules:
            missing = sorted(modules - set(g.modules)) or sorted(set(g.modules) - modules)
            raise ValueError(f"gram directories disagree: {g.path} and {grams[0].path} differ in modules {missing[:3]}; recompute grams for the same model")
    names = set(model.names())
    for module in sorted(modules):
        if f"{module}.weight" not in names and module != LM_HEAD:
            raise ValueError(f"{grams[0].path}: has a gram for {module!r}, which is not a Linear of {model.path}; were the grams computed for another model?")
    solve = {m for m in modules if m != LM_HEAD}
    if lm_head:
        if is_tied(model.path) or f"{LM_HEAD}.weight" not in names:
            log.warning("lm_head is tied to the input embeddings in %s: averaging it instead of solving it", model.path)
        elif LM_HEAD not in modules:
            raise ValueError(f"{grams[0].path}: no gram for lm_head, but RegMean on lm_head was asked for; compute grams with lm_head (params.yaml: gram.include_lm_head: true)")
        else:
            solve.add(LM_HEAD)
    for module in sorted(solve):
        in_features = model.shape(f"{module}.weight")[-1]
        for g in grams:
            shape = g.shape(module)
            if shape != (in_features, in_features):
                raise ValueError(f"{g.path / g.modules[module].file}: gram of {module} has shape {shape}, expected ({in_features}, {in_features})")
    return sorted(solve)


@register
class RegMean(MergeMethod):
    name = "regmean"
    paper = "https://arxiv.org/abs/2212.09849"
    uses_grams = True
    params = (ALPHA, WEIGHTS, SOLVER_DTYPE)

    def __init__(self, values=None):
        super().__init__(values)
        self.fallbacks: list[str] = []  # tensors solved by least squares (the gram sum was not positive definite)
        self.solved: dict[str, list[GramHandle]] = {}  # tensor -> its grams, one per expert
        self._factored: tuple[object, torch.Tensor, bool] | None = None  # (cache key, factor or lhs, is_cholesky)

    @property
    def solver_dtype(self) -> torch.dtype:
        return getattr(torch, self.value("solver_dtype", ""))

    def use_grams(self, grams: Sequence["GramDir"], model: "CheckpointReader", *, lm_head: bool = False) -> None:
        """Solve every block Linear with grams (and lm_head with `lm_head`, unless tied)."""
        dtype = self.solver_dtype
        self.solved = {f"{m}.weight": [GramHandle(g, m, dtype, self.device) for g in grams] for m in solved_modules(grams, model, lm_head=lm_head)}

    def gram_handles(self, tensor: str) -> Optional[list[GramHandle]]:
        return self.solved.get(tensor)

    def group(self, tensor: str) -> str:
        """Linears that share one input (q/k/v, gate/up) share one factorisation: one group."""
        handles = self.solved.get(tensor)
        return handles[0].grams.modules[handles[0].module].key if handles else tensor

    def report(self) -> dict:
        return {"solved_modules": len(self.solved), "lm_head_solved": f"{LM_HEAD}.weight" in self.solved, "least_squares_fallback": list(self.fallbacks)}

    def _factor(self, name: str, grams: Sequence[GramLoader], weights: list[float], alpha: float) -> tuple[torch.Tensor, bool]:
        """Cholesky factor of `sum_i w_i G~_i` (or the matrix itself when not positive definite).

        Cached for the next call with the same grams, weights and alpha: the row blocks of one
        tensor, and the modules of one `group` (q/k/v, gate/up share a `GramHandle.key`), which
        the engine merges one after another.
        """
        keys = tuple(g.key if isinstance(g, GramHandle) else None for g in grams)
        cache_key = (keys if None not in keys else name, tuple(weights), alpha)
        if self._factored and self._factored[0] == cache_key:
            if not self._factored[2]:
                self.fallbacks.append(name)
            return self._factored[1], self._factored[2]
        self._factored = None
        lhs = None
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
            self.fallbacks.append(name)
            log.warning("%s: gram sum is not positive definite; solving by least squares", name)
            self._factored = (cache_key, lhs, False)
        return self._factored[1], self._factored[2]

    def merge(self, name: str, tensors: Sequence[torch.Tensor], *, grams: Optional[Sequence[GramLoader]] = None, base: Optional[torch.Tensor] = None) -> torch.Tensor:
        weights = self.expert_weights(name, len(tensors), normalise=True)
        if grams is None:
            return weighted_sum(tensors, weights)
        dtype, device, alpha = self.solver_dtype, self.device, self.value("alpha", name)
        factor, is_cholesky = self._factor(name, grams, weights, alpha)
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
