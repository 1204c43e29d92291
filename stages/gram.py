"""DVC stage `gram@<expert>`: the grams of one expert on its calibration data (params: gram)."""

from pathlib import Path

from mergeflow.grams.collect import compute_grams
from mergeflow.stage import run_stage


def add_arguments(parser):
    parser.add_argument("--model", type=Path, required=True, help="the expert's model directory")
    parser.add_argument("--data", type=Path, required=True, help="calibration JSONL (a `text` field per row)")
    parser.add_argument("--out", type=Path, required=True, help="gram directory to write")


def main(args, params):
    g = params.gram
    compute_grams(
        args.model, args.data, args.out,
        max_length=g.max_length, batch_size=g.batch_size, num_samples=g.num_samples, device=g.device, include_lm_head=g.include_lm_head,
    )


if __name__ == "__main__":
    run_stage(__doc__, add_arguments, main)
