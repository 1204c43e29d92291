"""DVC stages `evaluate` and `evaluate-*`: lm-eval metrics of one model (params: eval)."""

from pathlib import Path

from mergeflow.evaluation.harness import evaluate_model
from mergeflow.stage import run_stage


def add_arguments(parser):
    parser.add_argument("--model", type=Path, required=True, help="model directory to evaluate")
    parser.add_argument("--out", type=Path, required=True, help="metrics JSON to write")


def main(args, params):
    e = params.eval
    evaluate_model(args.model, e.tasks, args.out, limit=e.limit, batch_size=e.batch_size, device=e.device, trust_remote_code=e.trust_remote_code)


if __name__ == "__main__":
    run_stage(__doc__, add_arguments, main)
