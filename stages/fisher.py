"""DVC stage `fisher@<expert>`: the diagonal Fisher of one expert on its calibration data, for
Fisher merging (params: method, and the calibration keys of `gram`, which it shares with grams).

When `method` reads no Fisher (every built-in method but `fisher`), it writes only a marker
directory (`fisher.json` saying why) without reading the model (about 2 s of CPU, mostly the
import of torch that validating the method params needs): the toy pipeline and every recipe pay
next to nothing for the stage unless they merge with Fisher."""

import mergeflow.pinned  # noqa: F401  first: pins the CPU kernels before torch loads (README "Reproducibility")

from pathlib import Path

from mergeflow.fisher import needs_fisher
from mergeflow.params import STAGE_PARAMS
from mergeflow.stage import run_stage

PARAMS = STAGE_PARAMS["fisher"]  # the keys it reads (dvc.yaml lists the same): each must be in the params file


def add_arguments(parser):
    parser.add_argument("--model", type=Path, required=True, help="the expert's model directory")
    parser.add_argument("--data", type=Path, required=True, help="calibration JSONL (a `text` field per row)")
    parser.add_argument("--out", type=Path, required=True, help="Fisher directory to write")


def main(args, params):
    if not needs_fisher(params.method):
        from mergeflow.fisher.format import write_marker

        write_marker(args.out, f"method {params.method!r} reads no Fisher", inputs=[args.model, args.data])
        return
    from mergeflow.fisher.compute import compute_fisher

    g = params.gram
    compute_fisher(args.model, args.data, args.out, text_field=g.text_field, max_length=g.max_length, num_samples=g.num_samples,
                   seed=g.seed, device=g.device, model_dtype=g.model_dtype, dtype=g.dtype)


if __name__ == "__main__":
    run_stage(__doc__, add_arguments, main, PARAMS)
