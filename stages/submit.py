"""DVC stage `submit`: answer data/test.csv with the merged model into submission.csv (params: submit, eval backend)."""

import mergeflow.pinned  # noqa: F401  first: pins the CPU kernels before torch loads (README "Reproducibility")

from pathlib import Path

from mergeflow.params import STAGE_READS
from mergeflow.stage import run_stage
from mergeflow.submission import write_submission

PARAMS = STAGE_READS["submit"]  # every key it reads, each in the params file (dvc.yaml lists STAGE_PARAMS["submit"])


def add_arguments(parser):
    parser.add_argument("--model", type=Path, required=True, help="the merged model directory")
    parser.add_argument("--test", type=Path, required=True, help="the competition's test.csv")
    parser.add_argument("--out", type=Path, required=True, help="submission.csv to write")


def main(args, params):
    # a header-only test.csv here is the download's (data.test_csv unset; it refuses an empty file of
    # the user's): write the header-only submission.csv the DVC output needs, and say so
    write_submission(args.model, args.test, args.out, params=params.eval, submit=params.submit, allow_empty=True)


if __name__ == "__main__":
    run_stage(__doc__, add_arguments, main, PARAMS)
