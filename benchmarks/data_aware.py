"""Wall time of the data-aware merges: grams + RegMean against RegMean++ (which makes its grams
layer by layer in the merge), and Fisher + Fisher merging, on the toy zoo or on a ~76M-parameter
Llama built here with random weights (`--case llama100m`: hidden 768, 12 layers, intermediate 2048,
the toy tokenizer's vocabulary; its "experts" are two seeds, its calibration the toy zoo's text).

    python benchmarks/data_aware.py --case toy --experts models/experts --calib data/calib
    python benchmarks/data_aware.py --case llama100m --calib data/calib --rows 64 --max-length 128

Each step runs once in this process after a warm-up import, with the kernels pinned as the stages
pin them; results go to benchmarks/results/data-aware-<case>.json.
"""

from __future__ import annotations

import mergeflow.pinned  # noqa: F401, I001

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from mergeflow.fisher.compute import compute_fisher
from mergeflow.grams.collect import compute_grams
from mergeflow.merge import merge_models
from mergeflow.methods import get_method
from mergeflow.regmean_pp import Calibration, merge_regmean_pp


def llama100m(root: Path, seeds=(0, 1)) -> list[Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from mergeflow.zoo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(8192 - 8)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                         num_key_value_heads=4, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        model.save_pretrained(root / f"e{seed}")
        tokenizer.save_pretrained(root / f"e{seed}")
        out.append(root / f"e{seed}")
    return out


def timed(what: str, fn) -> float:
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    print(f"{what}: {seconds:.1f} s", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["toy", "llama100m"], default="toy")
    parser.add_argument("--experts", type=Path, default=Path("models/experts"))
    parser.add_argument("--calib", type=Path, default=Path("data/calib"))
    parser.add_argument("--names", nargs="+", default=["math", "code"])
    parser.add_argument("--rows", type=int, default=None, help="calibration rows per expert [default: all]")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--fisher", action="store_true", help="also Fisher + Fisher merging")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mergeflow-bench-") as tmp:
        tmp = Path(tmp)
        experts = llama100m(tmp) if args.case == "llama100m" else [args.experts / n for n in args.names]
        calib = [args.calib / f"{n}.jsonl" for n in args.names]
        options = {"alpha": 0.1}
        t = {}
        t["grams"] = sum(timed(f"grams {e.name}", lambda e=e, c=c: compute_grams(e, c, tmp / f"g-{e.name}", max_length=args.max_length,
                                                                                     batch_size=args.batch_size, num_samples=args.rows)) for e, c in zip(experts, calib))
        t["regmean"] = timed("regmean merge", lambda: merge_models(experts, get_method("regmean")(options), tmp / "m-regmean", grams=[tmp / f"g-{e.name}" for e in experts]))
        cal = Calibration(tuple(calib), max_length=args.max_length, batch_size=args.batch_size, num_samples=args.rows)
        t["regmean_pp"] = timed("regmean_pp merge", lambda: merge_regmean_pp(experts, get_method("regmean_pp")(options), tmp / "m-pp", calibration=cal))
        if args.fisher:
            t["fisher"] = sum(timed(f"fisher {e.name}", lambda e=e, c=c: compute_fisher(e, c, tmp / f"f-{e.name}", max_length=args.max_length, num_samples=args.rows))
                              for e, c in zip(experts, calib))
            t["fisher_merge"] = timed("fisher merge", lambda: merge_models(experts, get_method("fisher")(), tmp / "m-fisher", fisher=[tmp / f"f-{e.name}" for e in experts]))
        from mergeflow.model_files import CheckpointReader

        reader = CheckpointReader(experts[0])
        t["parameters"] = sum(s.numel for s in reader.specs.values())
        t["ratio_pp_to_grams_plus_regmean"] = t["regmean_pp"] / (t["grams"] + t["regmean"])
        t.update(rows=args.rows, max_length=args.max_length, batch_size=args.batch_size, threads=torch.get_num_threads())
    print(json.dumps(t, indent=2))
    out = Path(__file__).parent / "results" / f"data-aware-{args.case}.json"
    out.write_text(json.dumps(t, indent=2) + "\n")


if __name__ == "__main__":
    main()
