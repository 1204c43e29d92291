"""Issue 17 on the default toy zoo: `mergeflow tune` (12 TPE trials over alpha and merge.weights)
against the README's 5-point alpha grid, in a copy of the working tree with its own DVC cache.

    python benchmarks/tune.py [--trials 12] [--out benchmarks/results/tune.json]

Measures: one cold `dvc repro` (every stage runs: what one uncached trial costs), the grid as five
`dvc exp run --temp -S alpha=...` experiments, and `mergeflow tune`. The validation objective is
the mean of the merged model's toy_math and toy_code exact match (the `tune:` group's default).
"Without caching" is the cold repro's time for each of the grid's and the tune's runs (not rerun
17 times: every stage of it is deterministic, so each would cost the same).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
GRID = [0.0, 0.1, 0.3, 0.5, 1.0]


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start, proc.stdout + proc.stderr


def objective(summary: dict) -> float:
    merged = summary["merged"]
    return (merged["toy_math"]["exact_match"] + merged["toy_code"]["exact_match"]) / 2


def main() -> None:
    from helpers import copy_repo, run  # tests/helpers.py: a copy of the working tree as a fresh repository

    from mergeflow.tune.experiments import head_commit, read_summary

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/tune.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mergeflow-tune-bench-") as tmp:
        repo = Path(tmp) / "repo"
        repo.mkdir()
        env = copy_repo(repo, Path(tmp) / "site", toy={})  # the default toy zoo, unchanged
        env = {**env, "PYTHONPATH": str(ROOT / "src")}
        raw = yaml.safe_load((repo / "params.yaml").read_text())
        raw["tune"].update(trials=args.trials, sampler="tpe", space={"alpha": [0.0, 1.0], "merge.weights": "simplex"})
        (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        cold, _ = timed(["dvc", "repro"], repo, env)
        run(["git", "add", "-A"], repo, env)
        run(["git", "commit", "-qm", "repro", "--allow-empty"], repo, env)
        baseline = head_commit(repo)
        grid, grid_seconds = {}, 0.0
        for alpha in GRID:
            seconds, _ = timed(["dvc", "exp", "run", "--temp", "--name", f"grid-{alpha:g}".replace(".", "_"), "-S", f"alpha={alpha}"], repo, env)
            grid_seconds += seconds
            grid[alpha] = objective(read_summary(repo, baseline, f"grid-{alpha:g}".replace(".", "_")))
        tune_seconds, out = timed([sys.executable, "-m", "mergeflow", "tune", "--plot", str(Path(tmp) / "tune.png")], repo, env)
        with open(repo / "metrics/tune/tune.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
    best = max((r for r in rows if r["state"] == "complete"), key=lambda r: float(r["objective"]))
    runs = len(GRID) + args.trials
    result = {
        "cold_repro_s": round(cold, 1), "grid_s": round(grid_seconds, 1), "tune_s": round(tune_seconds, 1),
        "uncached_grid_and_tune_s": round(cold * runs, 1), "grid": grid, "grid_best": max(grid.values()),
        "tune_best": float(best["objective"]), "tune_best_params": {k: v for k, v in best.items() if k not in ("state", "objective", "best")},
        "trials": [{k: v for k, v in r.items()} for r in rows], "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(out.splitlines()[-3:])
    print(f"| cold dvc repro | {cold:.0f} s |\n| 5-point alpha grid (cached experiments) | {grid_seconds:.0f} s, best objective {max(grid.values()):.3f} |\n"
          f"| mergeflow tune, {args.trials} trials | {tune_seconds:.0f} s, best objective {float(best['objective']):.3f} |\n"
          f"| grid + tune without caching ({runs} cold runs) | {cold * runs:.0f} s |")


if __name__ == "__main__":
    main()
