"""Memory and speed of `mergeflow merge` on synthetic Llama experts (issue: merge engine).

    python benchmarks/merge_benchmark.py --case small           # 2 x 1.5 GB experts + 2 x 1.4 GB grams
    python benchmarks/merge_benchmark.py --case llama3-shapes   # Llama-3-8B layer shapes, 2 layers, lm_head solved

For each case, from the same run (page cache warm, or evicted before every run with --cold): the I/O floor (reading every input tensor
once), the streaming RegMean merge, the naive all-in-memory merge of the reference (small case),
and `average` beside mergekit's `linear` (when mergekit is installed in .venv-bench). Peak
anonymous memory is polled over the process tree (see memory.py). Results go to
benchmarks/results/<case>.json and are printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
from memory import measure  # noqa: E402
from synthetic import ensure_case  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
READ_ALL = """
import sys
from pathlib import Path
from safetensors import safe_open
for d in sys.argv[1:]:
    for f in sorted(Path(d).glob('*.safetensors')):
        with safe_open(f, framework='pt') as h:
            for k in h.keys():
                t = h.get_tensor(k); del t
"""


def evict(dirs) -> None:
    """Drop the inputs' pages from the page cache (POSIX_FADV_DONTNEED), so the next run reads the disk."""
    for d in dirs:
        for f in Path(d).glob("*.safetensors"):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def size_of(dirs) -> int:
    return sum(f.stat().st_size for d in dirs for f in Path(d).glob("*.safetensors"))


def max_abs_diff(a: Path, b: Path) -> float:
    def tensors(d):
        out = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            with safe_open(f, framework="pt") as h:
                out.update({k: (f, k) for k in h.keys()})
        return out

    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys(), "outputs differ in tensor names"
    worst = 0.0
    for k in ta:
        with safe_open(ta[k][0], framework="pt") as fa, safe_open(tb[k][0], framework="pt") as fb:
            worst = max(worst, float((fa.get_tensor(k) - fb.get_tensor(k)).abs().max()))
    return worst


def row(label: str, m, inputs: int, floor: float | None) -> dict:
    if m.returncode:
        sys.exit(f"{label} failed with exit code {m.returncode}")
    return {
        "run": label, "seconds": round(m.seconds, 1), "peak_anon_gib": round(m.peak_anon_bytes / GIB, 2),
        "peak_rss_gib": round(m.peak_rss_bytes / GIB, 2), "anon_over_inputs": round(m.peak_anon_bytes / inputs, 3),
        "time_over_io_floor": round(m.seconds / floor, 2) if floor else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=["small", "llama3-shapes"], default="small")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mergeflow-bench")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--cold", action="store_true", help="evict the inputs from the page cache before every measured run")
    parser.add_argument("--device", default="cpu", help="where mergeflow's RegMean solves: cpu, cuda or auto")
    args = parser.parse_args()
    lm_head = args.case == "llama3-shapes"
    paths = ensure_case(args.workdir, args.case, lm_head=lm_head)
    experts, grams = paths["experts"], paths["grams"]
    inputs = size_of(experts + grams)
    py = sys.executable
    work = args.workdir / args.case
    results = {"case": args.case, "inputs_gib": round(inputs / GIB, 2), "weights_gib": round(size_of(experts) / GIB, 2), "threads": torch.get_num_threads(), "runs": []}

    def prepare() -> None:
        if args.cold:
            evict(experts + grams)

    if not args.cold:
        subprocess.run([py, "-c", READ_ALL, *map(str, experts + grams)], check=True)  # warm the page cache
    prepare()
    floor = measure([py, "-c", READ_ALL, *map(str, experts + grams)])
    results["runs"].append(row("I/O floor: read every input tensor once", floor, inputs, None))

    model_args = [a for e in experts for a in ("--model", str(e))]
    gram_args = [a for g in grams for a in ("--gram", str(g))]
    prepare()
    regmean = measure([py, "-m", "mergeflow", "merge", "--method", "regmean", "--alpha", "0.1", *model_args, *gram_args, "--out", str(work / "out-regmean"), "--force", "--device", args.device, *(["--lm-head"] if lm_head else [])])
    results["runs"].append(row(f"mergeflow regmean (streaming, {args.device})" + (" + lm_head" if lm_head else ""), regmean, inputs, floor.seconds))

    if not args.skip_naive and args.case == "small":
        prepare()
        naive = measure([py, str(ROOT / "benchmarks" / "naive_regmean.py"), "--alpha", "0.1", "--out", str(work / "out-naive"), *(str(p) for pair in zip(experts, grams) for p in pair)])
        results["runs"].append(row("naive all-in-memory regmean (reference's way)", naive, inputs, floor.seconds))
        results["regmean_streaming_vs_naive_max_abs_diff"] = max_abs_diff(work / "out-regmean", work / "out-naive")

    weights = size_of(experts)
    prepare()
    avg = measure([py, "-m", "mergeflow", "merge", "--method", "average", *model_args, "--out", str(work / "out-average"), "--force"])
    results["runs"].append(row("mergeflow average", avg, weights, None))
    mergekit = ROOT / ".venv-bench" / "bin" / "mergekit-yaml"
    if not args.skip_mergekit and mergekit.exists():
        config = work / "mergekit-linear.yml"
        config.write_text(json.dumps({"merge_method": "linear", "dtype": "float32", "models": [{"model": str(e), "parameters": {"weight": 1.0}} for e in experts]}))
        prepare()
        mk = measure([str(mergekit), str(config), str(work / "out-mergekit"), "--lazy-unpickle", "--allow-crimes"])
        results["runs"].append(row("mergekit 0.1.5 linear", mk, weights, None))
        results["average_vs_mergekit_max_abs_diff"] = max_abs_diff(work / "out-average", work / "out-mergekit")

    results["page_cache"] = "cold" if args.cold else "warm"
    out = ROOT / "benchmarks" / "results" / f"{args.case}{'-cold' if args.cold else ''}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"case {args.case}: inputs {results['inputs_gib']} GiB (weights {results['weights_gib']} GiB), {results['threads']} threads, {results['page_cache']} page cache")
    print("| run | seconds | peak anon GiB | peak RSS GiB | anon / inputs | time / I/O floor |\n|---|---|---|---|---|---|")
    for r in results["runs"]:
        print(f"| {r['run']} | {r['seconds']} | {r['peak_anon_gib']} | {r['peak_rss_gib']} | {r['anon_over_inputs']} | {r['time_over_io_floor'] or ''} |")
    for key in ("regmean_streaming_vs_naive_max_abs_diff", "average_vs_mergekit_max_abs_diff"):
        if key in results:
            print(f"{key}: {results[key]:.3g}")


if __name__ == "__main__":
    main()
