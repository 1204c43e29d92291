"""DVC stage `download`: the base model, the experts and their data (params: models, data, experts)."""

import mergeflow.pinned  # noqa: F401  first: pins the CPU kernels before torch loads (README "Reproducibility")

from pathlib import Path

from mergeflow.stage import run_stage
from mergeflow.zoo.sources import materialise


def add_arguments(parser):
    parser.add_argument("--models", type=Path, default=Path("models"), help="writes base/ and experts/<name>/ here")
    parser.add_argument("--data", type=Path, default=Path("data"), help="writes calib/, eval/ and test.csv here")


def main(args, params):
    materialise(params, args.models, args.data)


if __name__ == "__main__":
    run_stage(__doc__, add_arguments, main)
