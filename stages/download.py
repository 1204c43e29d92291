"""DVC stages `download-base`, `download@<expert>` and `download-eval`: the base model, each expert
with its calibration data, and the evaluation and test data (params: models, data, experts)."""

import mergeflow.pinned  # noqa: F401  first: pins the CPU kernels before torch loads (README "Reproducibility")

from pathlib import Path

from mergeflow.atomic import atomic_file
from mergeflow.params import STAGE_READS
from mergeflow.pipeline import check_in_sync
from mergeflow.stage import run_stage
from mergeflow.zoo.sources import materialise_base, materialise_eval, materialise_expert

PARAMS = STAGE_READS["download"]  # every key it reads, each in the params file (dvc.yaml lists STAGE_PARAMS["download"])


def add_arguments(parser):
    parser.add_argument("part", choices=["base", "expert", "eval"], help="what to put in place")
    parser.add_argument("expert", nargs="?", help="the expert's name (part `expert`)")
    parser.add_argument("--models", type=Path, default=Path("models"), help="holds base/ and experts/<name>/")
    parser.add_argument("--data", type=Path, default=Path("data"), help="holds calib/, eval/ and test.csv")
    parser.add_argument("--losses", type=Path, help="CSV (step,loss) of the training run, when the part is trained")
    parser.add_argument("--dvc-yaml", type=Path, default=Path("dvc.yaml"), help="pipeline whose download stages must match the params")


def write_losses(path: Path, losses: list[float]) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text("step,loss\n" + "".join(f"{step},{loss!r}\n" for step, loss in enumerate(losses, 1)))


def main(args, params):
    check_in_sync(args.dvc_yaml, params, args.params)
    if args.part == "base":
        losses = materialise_base(params, args.models)
    elif args.part == "expert":
        if not args.expert:
            raise ValueError("download.py expert: name the expert (e.g. `download.py expert math`)")
        losses = materialise_expert(params, args.expert, args.models, args.data)["losses"]
    else:
        materialise_eval(params, args.models, args.data)
        return
    if args.losses:
        write_losses(args.losses, losses)


if __name__ == "__main__":
    run_stage(__doc__, add_arguments, main, PARAMS)
