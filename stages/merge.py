"""DVC stage `merge`: merge the experts (params: method, alpha, experts, merge, and the calibration
keys of `gram` that regmean_pp forwards the calibration data with). A plugin method
(`method: methods/x.py:Class`) must live in methods/, a dependency of this stage."""

import mergeflow.pinned  # noqa: F401  first: pins the CPU kernels before torch loads (README "Reproducibility")

from pathlib import Path

from mergeflow.model_files import parse_size
from mergeflow.merge import Checks, merge_models
from mergeflow.mergekit_config import plan_block
from mergeflow.methods import UnknownMethod, get_method
from mergeflow.params import STAGE_READS
from mergeflow.pipeline import check_plugin
from mergeflow.regmean_pp import Calibration, merge_regmean_pp
from mergeflow.stage import run_stage

PARAMS = STAGE_READS["merge"]  # every key it reads, each in the params file (dvc.yaml lists STAGE_PARAMS["merge"])


def add_arguments(parser):
    parser.add_argument("--experts", type=Path, required=True, help="folder holding one model directory per expert")
    parser.add_argument("--grams", type=Path, required=True, help="folder holding one gram directory per expert")
    parser.add_argument("--fisher", type=Path, help="folder holding one Fisher directory per expert (method fisher)")
    parser.add_argument("--calib", type=Path, help="folder holding one <expert>.jsonl calibration file per expert (method regmean_pp)")
    parser.add_argument("--base", type=Path, required=True, help="the base model (task_arithmetic, ties)")
    parser.add_argument("--out", type=Path, required=True, help="merged model directory to write")
    parser.add_argument("--dvc-yaml", type=Path, default=Path("dvc.yaml"), help="pipeline whose plugin folder a `file.py:Class` method must be in")


def main(args, params):
    m = params.merge
    if params.method == "mergekit":  # a mergekit config in params.yaml (merge.mergekit)
        method, experts, base = plan_block(m.mergekit, params.experts, args.experts, args.base)
        merge_models(experts, method, args.out, base=base, device=m.device, max_shard_size=parse_size(m.max_shard_size), checks=Checks(magnitudes=m.check_magnitude))
        return
    check_plugin(params.method, args.dvc_yaml)
    try:
        cls = get_method(params.method)
    except UnknownMethod as err:
        raise ValueError(f"{err} (params.yaml: method)") from None
    method = cls.from_params({"alpha": params.alpha, **m.method_values()})  # each method takes its own knobs
    experts = [args.experts / name for name in params.experts]
    for option, needed in (("--fisher", getattr(method, "uses_fisher", False)), ("--calib", getattr(method, "needs_calibration", False))):
        if needed and getattr(args, option[2:]) is None:
            raise ValueError(f"method {params.method!r} needs {option} (dvc.yaml's merge stage passes it: update dvc.yaml from the shipped one)")
    if getattr(method, "needs_calibration", False):  # regmean_pp: layer by layer, through the calibration data
        g = params.gram
        calibration = Calibration(tuple(args.calib / f"{name}.jsonl" for name in params.experts), text_field=g.text_field, max_length=g.max_length,
                                  num_samples=g.num_samples, seed=g.seed, batch_size=g.batch_size, model_dtype=g.model_dtype)
        merge_regmean_pp(experts, method, args.out, calibration=calibration, device=m.device,
                         max_shard_size=parse_size(m.max_shard_size), check_magnitudes=m.check_magnitude)
        return
    merge_models(
        experts, method, args.out, fisher=[args.fisher / name for name in params.experts] if getattr(method, "uses_fisher", False) else (),
        grams=[args.grams / name for name in params.experts] if method.uses_grams else [],
        base=args.base, lm_head=m.regmean_lm_head, device=m.device, max_shard_size=parse_size(m.max_shard_size), checks=Checks(magnitudes=m.check_magnitude),
    )


if __name__ == "__main__":
    run_stage(__doc__, add_arguments, main, PARAMS)
