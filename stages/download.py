"""DVC stage `download`: the base model, the experts and their data (params: models, data, experts)."""

from pathlib import Path

from mergeflow.params import STAGE_PARAMS
from mergeflow.stage import run_stage
from mergeflow.zoo.sources import materialise

PARAMS = STAGE_PARAMS["download"]  # the keys it reads (dvc.yaml lists the same): each must be in the params file


def add_arguments(parser):
    parser.add_argument("--models", type=Path, default=Path("models"), help="writes base/ and experts/<name>/ here")
    parser.add_argument("--data", type=Path, default=Path("data"), help="writes calib/, eval/ and test.csv here")


def main(args, params):
    materialise(params, args.models, args.data)


if __name__ == "__main__":
    run_stage(__doc__, add_arguments, main, PARAMS)
