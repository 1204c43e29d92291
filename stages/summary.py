"""DVC stage `summary`: metrics/summary.json, one table of the base, each expert and the merged
model (the pipeline's only DVC metrics file), and the tables `dvc plots` draws from it."""

import mergeflow.pinned  # noqa: F401  first: pins the CPU kernels before torch loads (README "Reproducibility")

from pathlib import Path

from mergeflow.atomic import write_json
from mergeflow.evaluation.harness import evaluation_summary, expert_label
from mergeflow.params import STAGE_READS
from mergeflow.plots import SCORES_HEADER, SWEEP_HEADER, score_rows, sweep_rows, write_csv
from mergeflow.stage import run_stage

PARAMS = STAGE_READS["summary"]  # every key it reads, each in the params file (dvc.yaml lists STAGE_PARAMS["summary"])


def add_arguments(parser):
    parser.add_argument("--metrics", type=Path, default=Path("metrics"), help="folder of base.json, experts/<name>.json, merged.json")
    parser.add_argument("--out", type=Path, required=True, help="summary JSON to write")
    parser.add_argument("--scores", type=Path, required=True, help="CSV to write: model,metric,score (every model)")
    parser.add_argument("--sweep", type=Path, required=True, help="CSV to write: method,alpha,metric,score (the merged model)")


def main(args, params):
    files = {"base": args.metrics / "base.json"}
    files.update({expert_label(name): args.metrics / "experts" / f"{name}.json" for name in params.experts})
    files["merged"] = args.metrics / "merged.json"
    summary = evaluation_summary(files)
    write_json(args.out, summary)
    write_csv(args.scores, SCORES_HEADER, score_rows(summary))
    write_csv(args.sweep, SWEEP_HEADER, sweep_rows(summary["merged"], params.method, params.alpha))


if __name__ == "__main__":
    run_stage(__doc__, add_arguments, main, PARAMS)
