"""What computing grams costs on top of the forward pass, and how torchrun scales it.

On a random Llama-architecture model of about 100M parameters (hidden 768, 12 layers,
intermediate 2048, 12 heads / 4 KV heads, vocabulary 16000, lm_head included as the reference
did), on the same batches of 4 x 256 tokens, in one run:

  (a) a plain forward pass;
  (b) the reference's way: a hook on every Linear computing `x^T x` in float32 for each module
      separately, padding included;
  (c) mergeflow's gram pass (`GramAccumulator`: each distinct input once, upper-triangle panels).

Reports (b)/(a) and (c)/(a) beside the FLOP ratios `(forward + gram FLOPs) / forward FLOPs`.
`--scaling` also times `mergeflow grams` with one process against `torchrun --nproc_per_node 2`
on the same data and checks that the grams agree.

    python benchmarks/gram_overhead.py [--batches 6] [--scaling] [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mergeflow.grams.accumulate import GramAccumulator, panel_bounds, probe_inputs
from mergeflow.grams.modules import discover

HERE = Path(__file__).parent


def model_config(args) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=4096, tie_word_embeddings=False,
    )


class ReferenceHooks:
    """The reference's gram collection: every Linear on its own, float32, padding included."""

    def __init__(self, linears):
        self.sums = {}
        self.handles = [m.register_forward_pre_hook(self.hook(n)) for n, m in linears.items()]

    def hook(self, name):
        def fn(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            if name not in self.sums:
                self.sums[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            self.sums[name].addmm_(x.T, x)

        return fn

    def close(self):
        for h in self.handles:
            h.remove()


def flops(cfg: LlamaConfig, seq: int, keys: dict[str, str], linears) -> dict[str, float]:
    """Per token: forward (2 x Linear params + attention scores), and both gram ways."""
    linear_params = sum(m.in_features * m.out_features for m in linears.values())
    attention = 2 * 2 * seq * cfg.hidden_size * cfg.num_hidden_layers / 2  # QK^T and AV, causal half on average
    forward = 2 * linear_params + attention
    reference = sum(2 * m.in_features**2 for m in linears.values())
    ours = 0.0
    for owner in {k for k in keys.values()}:
        n = linears[owner].in_features
        ours += sum(2 * (e - s) * (n - s) for s, e in panel_bounds(n))
    return {"forward": forward, "reference_gram": reference, "mergeflow_gram": ours}


@torch.no_grad()
def overhead(args) -> dict:
    torch.manual_seed(0)
    cfg = model_config(args)
    dtype = getattr(torch, args.dtype)
    model = LlamaForCausalLM(cfg).to(device=args.device, dtype=dtype).eval()
    params = sum(p.numel() for p in model.parameters())
    modules = discover(model, include_lm_head=True)
    linears = modules.linears()
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=args.device) for _ in range(args.batches)]
    mask = torch.ones(args.batch, args.seq, dtype=torch.long, device=args.device)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def plain():
        for ids in batches:
            model(input_ids=ids, attention_mask=mask, use_cache=False)

    def reference():
        hooks = ReferenceHooks(linears)
        try:
            plain()
        finally:
            hooks.close()

    acc_keys, _ = probe_inputs(model, linears, batches[0][:1, :8], mask[:1, :8])
    in_features = {k: modules.solved[k].in_features for k in set(acc_keys.values())}

    def ours():
        acc = GramAccumulator(linears, acc_keys, in_features, device=args.device)
        try:
            for ids in batches:
                acc.forward(model, ids, mask)
        finally:
            acc.close()

    runs = {"forward": plain, "reference": reference, "mergeflow": ours}
    times = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    plain()  # warm-up
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit all three alike
        for name, fn in runs.items():
            sync()
            t, c = time.perf_counter(), time.process_time()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)  # CPU seconds: less sensitive to other jobs on a shared machine
    best = {k: min(v) for k, v in times.items()}
    best_cpu = {k: min(v) for k, v in cpu.items()}
    f = flops(cfg, args.seq, acc_keys, linears)
    tokens = args.batch * args.seq * args.batches
    return {
        "params": params, "tokens": tokens, "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "seconds": best,
        "tokens_per_s": {k: tokens / v for k, v in best.items()},
        "time_ratio": {"reference/forward": best["reference"] / best["forward"], "mergeflow/forward": best["mergeflow"] / best["forward"]},
        "cpu_seconds": best_cpu,
        "cpu_time_ratio": {"reference/forward": best_cpu["reference"] / best_cpu["forward"], "mergeflow/forward": best_cpu["mergeflow"] / best_cpu["forward"]},
        "flop_ratio": {"reference": (f["forward"] + f["reference_gram"]) / f["forward"], "mergeflow": (f["forward"] + f["mergeflow_gram"]) / f["forward"]},
    }


def scaling(args) -> dict:
    """`mergeflow grams` in one process against torchrun with 2 ranks, same data, same model."""
    from mergeflow.grams import GramDir
    from mergeflow.zoo.tokenizer import build_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        tok = build_tokenizer(256)
        cfg = model_config(args)
        cfg.vocab_size = len(tok)
        cfg.pad_token_id = tok.pad_token_id
        LlamaForCausalLM(cfg).save_pretrained(tmp / "model")
        tok.save_pretrained(tmp / "model")
        rng = torch.Generator().manual_seed(0)
        chars = "0123456789+-=abcdefghijklmnopqrstuvwxyz "
        rows = ["".join(chars[i] for i in torch.randint(0, len(chars), (int(n),), generator=rng)) for n in torch.randint(64, args.seq, (args.scaling_rows,), generator=rng)]
        (tmp / "calib.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
        common = ["grams", "--model", tmp / "model", "--data", tmp / "calib.jsonl", "--max-length", args.seq, "--batch-size", args.batch, "--checkpoint-every", 0]
        out = {}
        for label, launcher, env in [
            ("1 process", [sys.executable, "-m", "mergeflow"], {}),
            ("torchrun 2 ranks", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mergeflow"], {"OMP_NUM_THREADS": str(max(1, os.cpu_count() // 2))}),
        ]:
            t = time.perf_counter()
            subprocess.run([*launcher, *map(str, common), "--out", tmp / label.replace(" ", "-")], check=True, capture_output=True, env={**os.environ, **env})
            out[label] = time.perf_counter() - t
        one, two = GramDir.open(tmp / "1-process"), GramDir.open(tmp / "torchrun-2-ranks")
        diff = max(float(((one.load(m) - two.load(m)).abs().max() / one.load(m).abs().max())) for m in one.modules)
        return {"rows": len(rows), "tokens": one.num_tokens, "seconds": out, "speedup": out["1 process"] / out["torchrun 2 ranks"],
                "same_tokens": one.num_tokens == two.num_tokens, "max_relative_difference": diff}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 makes CPU-time ratios robust on a shared machine)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--scaling", action="store_true", help="also time torchrun --nproc_per_node 2 against one process")
    p.add_argument("--no-overhead", action="store_true", help="skip the overhead comparison (with --scaling)")
    p.add_argument("--scaling-rows", type=int, default=96)
    p.add_argument("--out", type=Path, default=HERE / "results" / "gram-overhead.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {} if args.no_overhead else {"overhead": overhead(args)}
    print(json.dumps(result, indent=2), flush=True)
    if args.scaling:
        result["scaling"] = scaling(args)
        print(json.dumps(result["scaling"], indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
