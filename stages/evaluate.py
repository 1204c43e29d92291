"""DVC stages `evaluate` and `evaluate-*`: lm-eval metrics of one model (params: eval). The local
files of `eval.data_files` are dependencies of these stages, written into dvc.yaml by `mergeflow use`."""

import mergeflow.pinned  # noqa: F401  first: pins the CPU kernels before torch loads (README "Reproducibility")

from pathlib import Path

from mergeflow.evaluation.code_eval import CodeExecutionRefused
from mergeflow.evaluation.harness import evaluate_model
from mergeflow.params import STAGE_READS
from mergeflow.pipeline import check_in_sync
from mergeflow.stage import run_stage

PARAMS = STAGE_READS["evaluate"]  # every key it reads, each in the params file (dvc.yaml lists STAGE_PARAMS["evaluate"])


def add_arguments(parser):
    parser.add_argument("--model", type=Path, required=True, help="model directory to evaluate")
    parser.add_argument("--out", type=Path, required=True, help="metrics JSON to write")
    parser.add_argument("--logs", type=Path, required=True, help="folder for the per-sample JSONL logs")
    parser.add_argument("--dvc-yaml", type=Path, default=Path("dvc.yaml"), help="pipeline whose evaluate stages must depend on eval.data_files")


def main(args, params):
    check_in_sync(args.dvc_yaml, params, args.params)
    e = params.eval
    try:
        evaluate_model(args.model, e.tasks, args.out, params=e, log_dir=args.logs if e.log_samples else None)
    except CodeExecutionRefused as err:
        raise ValueError(f"{err}: set eval.allow_code_execution: true in {args.params} to run them") from None
    if not e.log_samples:  # the folder is a DVC output: leave an empty one
        args.logs.mkdir(parents=True, exist_ok=True)


if __name__ == "__main__":
    run_stage(__doc__, add_arguments, main, PARAMS)
