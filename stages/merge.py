"""DVC stage `merge`: merge the experts (params: method, alpha, experts, merge)."""

from pathlib import Path

import torch

from mergeflow.merge import merge_models
from mergeflow.methods import get_method
from mergeflow.stage import run_stage


def add_arguments(parser):
    parser.add_argument("--experts", type=Path, required=True, help="folder holding one model directory per expert")
    parser.add_argument("--grams", type=Path, required=True, help="folder holding one gram directory per expert")
    parser.add_argument("--out", type=Path, required=True, help="merged model directory to write")


def main(args, params):
    method = get_method(params.method)(alpha=params.alpha, solver_dtype=getattr(torch, params.merge.solver_dtype))
    experts = [args.experts / name for name in params.experts]
    grams = [args.grams / name for name in params.experts] if method.uses_grams else []
    merge_models(experts, method, args.out, grams=grams)


if __name__ == "__main__":
    run_stage(__doc__, add_arguments, main)
