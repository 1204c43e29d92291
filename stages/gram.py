"""DVC stage `gram@<expert>`: the grams of one expert on its calibration data (params: gram)."""

import mergeflow.pinned  # noqa: F401  first: pins the CPU kernels before torch loads (README "Reproducibility")

from pathlib import Path

from mergeflow.grams.collect import compute_grams
from mergeflow.params import STAGE_PARAMS
from mergeflow.stage import run_stage

PARAMS = STAGE_PARAMS["gram"]  # the keys it reads (dvc.yaml lists the same): each must be in the params file


def add_arguments(parser):
    parser.add_argument("--model", type=Path, required=True, help="the expert's model directory")
    parser.add_argument("--data", type=Path, required=True, help="calibration JSONL (a `text` field per row)")
    parser.add_argument("--out", type=Path, required=True, help="gram directory to write")
    parser.add_argument("--shard", default=None, help="compute only slice i/n of the rows (see README: Gram slices)")


def main(args, params):
    compute_grams(args.model, args.data, args.out, params.gram, shard=args.shard)


if __name__ == "__main__":
    run_stage(__doc__, add_arguments, main, PARAMS)
