"""DVC stage `merge`: merge the experts (params: method, alpha, experts, merge). A plugin method
(`method: methods/x.py:Class`) must live in methods/, a dependency of this stage."""

import mergeflow.pinned  # noqa: F401  first: pins the CPU kernels before torch loads (README "Reproducibility")

from pathlib import Path

from mergeflow.checkpoint import parse_size
from mergeflow.merge import merge_models
from mergeflow.methods import get_method
from mergeflow.params import STAGE_PARAMS
from mergeflow.pipeline import check_plugin
from mergeflow.stage import run_stage

PARAMS = STAGE_PARAMS["merge"]  # the keys it reads (dvc.yaml lists the same): each must be in the params file


def add_arguments(parser):
    parser.add_argument("--experts", type=Path, required=True, help="folder holding one model directory per expert")
    parser.add_argument("--grams", type=Path, required=True, help="folder holding one gram directory per expert")
    parser.add_argument("--base", type=Path, required=True, help="the base model (task_arithmetic, ties)")
    parser.add_argument("--out", type=Path, required=True, help="merged model directory to write")
    parser.add_argument("--dvc-yaml", type=Path, default=Path("dvc.yaml"), help="pipeline whose plugin folder a `file.py:Class` method must be in")


def main(args, params):
    check_plugin(params.method, args.dvc_yaml)
    m = params.merge
    cls = get_method(params.method)
    given = {"alpha": params.alpha, **m.method_values()}  # params.yaml holds the knobs of every method: each takes its own
    method = cls({name: value for name, value in given.items() if name in {p.name for p in cls.params}})
    merge_models(
        [args.experts / name for name in params.experts], method, args.out,
        grams=[args.grams / name for name in params.experts] if method.uses_grams else [],
        base=args.base, lm_head=m.regmean_lm_head, device=m.device, max_shard_size=parse_size(m.max_shard_size), check_magnitudes=m.check_magnitude,
    )


if __name__ == "__main__":
    run_stage(__doc__, add_arguments, main, PARAMS)
