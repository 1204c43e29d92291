"""Are the zoo, grams and merge bit-identical across thread counts and instruction sets, and what
does each way of pinning the CPU kernels cost?

    python benchmarks/determinism.py [--settings unpinned,avx2,compatible] [--toy KEY=VALUE ...] [--out FILE.json]

For each setting it runs the `download` (toy zoo from params.yaml), `gram` (each expert) and
`merge` stage scripts in a temporary directory under several simulated CPUs, hashes every output
file and compares each run with the first. `avx2` is what the stages ship (they pin themselves,
`mergeflow.determinism`); the others opt out with MERGEFLOW_BITWISE=0 and set their own variables.
Costs are user+sys CPU seconds of the stage processes (`getrusage`) and wall seconds, so that a
busy machine shows in the wall time more than in the CPU time. README figures: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = {
    "unpinned": {"MERGEFLOW_BITWISE": "0"},
    "avx2": {},  # the stages' own pin: MKL_CBWR=AVX2,STRICT, ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2
    "avx2-no-onednn": {"MERGEFLOW_BITWISE": "0", "MKL_CBWR": "AVX2,STRICT", "ATEN_CPU_CAPABILITY": "avx2"},
    "compatible": {"MERGEFLOW_BITWISE": "0", "MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default"},
}
# Another machine, simulated: its thread count, and an AVX2-only CPU for MKL and oneDNN, and for
# ATen (a pinned setting overrides ATEN_CPU_CAPABILITY, so that column only matters unpinned).
CPUS = {
    "2 threads": {"OMP_NUM_THREADS": "2"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "MKL+oneDNN AVX2": {"OMP_NUM_THREADS": "2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "ATen avx2": {"OMP_NUM_THREADS": "2", "ATEN_CPU_CAPABILITY": "avx2"},
}
PIN_VARS = ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "MERGEFLOW_BITWISE")
GROUPS = {"zoo": ("models/base", "models/experts", "data"), "grams": ("models/grams",), "merge": ("models/merged",)}


def stage_env(setting: dict, cpu: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in PIN_VARS}
    env.update(PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.update(cpu)
    env.update(setting)  # a pin overrides what the simulated CPU says, as the stages' own pin does
    return env


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, float]:
    """Run `cmd`; return its (user+sys CPU seconds, wall seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, wall


def digests(work: Path, folders: tuple[str, ...]) -> dict[str, str]:
    return {
        str(f.relative_to(work)): hashlib.sha256(f.read_bytes()).hexdigest()
        for folder in folders for f in sorted((work / folder).rglob("*")) if f.is_file()
    }


def run_pipeline(params: dict, env: dict) -> dict:
    """download, gram per expert and merge in a fresh directory: digests and costs per group."""
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="mergeflow-determinism-") as tmp:
        work = Path(tmp)
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        cost = {"zoo": timed([py, str(ROOT / "stages/download.py"), "--models", "models", "--data", "data"], work, env)}
        gram = [0.0, 0.0]
        for expert in params["experts"]:
            c, w = timed([py, str(ROOT / "stages/gram.py"), "--model", f"models/experts/{expert}", "--data", f"data/calib/{expert}.jsonl", "--out", f"models/grams/{expert}"], work, env)
            gram = [gram[0] + c, gram[1] + w]
        cost["grams"] = tuple(gram)
        cost["merge"] = timed([py, str(ROOT / "stages/merge.py"), "--experts", "models/experts", "--grams", "models/grams", "--base", "models/base", "--out", "models/merged"], work, env)
        return {group: {"files": digests(work, folders), "cpu_s": cost[group][0], "wall_s": cost[group][1]} for group, folders in GROUPS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="unpinned,avx2,compatible", help=f"comma-separated, from {', '.join(SETTINGS)}")
    parser.add_argument("--cpus", default=",".join(CPUS), help=f"comma-separated, from {', '.join(CPUS)}; the first is the reference")
    parser.add_argument("--toy", action="append", default=[], help="override a models.toy parameter, e.g. base_steps=20")
    parser.add_argument("--out", type=Path, help="also write every result (digests, costs) here as JSON")
    args = parser.parse_args()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for item in args.toy:
        key, value = item.split("=", 1)
        params["models"]["toy"][key] = yaml.safe_load(value)
    results = {}
    for setting in args.settings.split(","):
        for cpu in args.cpus.split(","):
            if setting != "unpinned" and CPUS[cpu].get("ATEN_CPU_CAPABILITY"):
                continue  # the pin overrides ATEN_CPU_CAPABILITY: same run as the reference
            print(f"{setting:>14} | {cpu:<16}", end=" ", flush=True)
            results[(setting, cpu)] = r = run_pipeline(params, stage_env(SETTINGS[setting], CPUS[cpu]))
            print("  ".join(f"{g} {r[g]['cpu_s']:.1f}/{r[g]['wall_s']:.1f}s" for g in GROUPS), flush=True)

    cpus = args.cpus.split(",")
    print("\n| setting | " + " | ".join(f"same as {cpus[0]}: {c}" for c in cpus[1:]) + " | " + " | ".join(f"{g} CPU s (wall s)" for g in GROUPS) + " |")
    print("|---" * (len(cpus) + len(GROUPS)) + "|")
    for setting in args.settings.split(","):
        ref = results[(setting, cpus[0])]
        cells = []
        for cpu in cpus[1:]:
            other = results.get((setting, cpu))
            if other is None:
                cells.append("(pinned)")
                continue
            differ = [g for g in GROUPS if other[g]["files"] != ref[g]["files"]]
            cells.append("identical" if not differ else "differ: " + ", ".join(differ))
        costs = [f"{ref[g]['cpu_s']:.1f} ({ref[g]['wall_s']:.1f})" for g in GROUPS]
        print(f"| {setting} | " + " | ".join(cells + costs) + " |")
    if args.out:
        args.out.write_text(json.dumps({f"{s} | {c}": r for (s, c), r in results.items()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
