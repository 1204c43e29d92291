"""DVC stage `merge`: merge the experts (params: method, alpha, experts, merge)."""

import mergeflow.pinned  # noqa: F401  first: pins the CPU kernels before torch loads (README "Reproducibility")

from pathlib import Path

import torch

from mergeflow.checkpoint import parse_size
from mergeflow.merge import merge_models
from mergeflow.methods import MergeOptions, get_method
from mergeflow.stage import run_stage


def add_arguments(parser):
    parser.add_argument("--experts", type=Path, required=True, help="folder holding one model directory per expert")
    parser.add_argument("--grams", type=Path, required=True, help="folder holding one gram directory per expert")
    parser.add_argument("--base", type=Path, required=True, help="the base model (task_arithmetic, ties)")
    parser.add_argument("--out", type=Path, required=True, help="merged model directory to write")


def main(args, params):
    m = params.merge
    options = MergeOptions(
        alpha=params.alpha, weights=tuple(m.weights) if m.weights else None, scaling=m.scaling, density=m.density,
        solver_dtype=getattr(torch, m.solver_dtype), device=m.device,
    )
    method = get_method(params.method)(options)
    merge_models(
        [args.experts / name for name in params.experts], method, args.out,
        grams=[args.grams / name for name in params.experts] if method.uses_grams else [],
        base=args.base, lm_head=m.regmean_lm_head, max_shard_size=parse_size(m.max_shard_size),
    )


if __name__ == "__main__":
    run_stage(__doc__, add_arguments, main)
