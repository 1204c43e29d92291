"""DVC stage `summary`: metrics/summary.json, one table of the base, each expert and the merged model."""

import mergeflow.pinned  # noqa: F401  first: pins the CPU kernels before torch loads (README "Reproducibility")

from pathlib import Path

from mergeflow.evaluation.harness import evaluation_summary
from mergeflow.io import write_json
from mergeflow.stage import run_stage


def add_arguments(parser):
    parser.add_argument("--metrics", type=Path, default=Path("metrics"), help="folder of base.json, experts/<name>.json, merged.json")
    parser.add_argument("--out", type=Path, required=True, help="summary JSON to write")


def main(args, params):
    files = {"base": args.metrics / "base.json"}
    files.update({f"expert-{name}": args.metrics / "experts" / f"{name}.json" for name in params.experts})
    files["merged"] = args.metrics / "merged.json"
    write_json(args.out, evaluation_summary(files))


if __name__ == "__main__":
    run_stage(__doc__, add_arguments, main)
