"""Wall time of each pipeline stage on the toy zoo (each forced to run), of `dvc exp run -S alpha=0.3`, and of a no-op
`dvc repro`, in a fresh clone of the committed repository (its own DVC cache).

    python benchmarks/pipeline_timing.py [--params-set KEY=VALUE ...]

Prints a Markdown table; the figures measured on the reference machine are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["download-base", "download@math", "download@code", "download-eval", "gram@math", "gram@code", "merge", "evaluate-base", "evaluate-expert@math", "evaluate-expert@code", "evaluate", "submit"]


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params-set", action="append", default=[], help="dvc exp-style overrides applied before timing, e.g. models.toy.base_steps=50")
    args = parser.parse_args()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="mergeflow-bench-") as tmp:
        repo = Path(tmp) / "repo"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
        subprocess.run(["dvc", "config", "--local", "core.site_cache_dir", str(Path(tmp) / "site")], cwd=repo, env=env, check=True)
        if args.params_set:
            import yaml

            params = yaml.safe_load((repo / "params.yaml").read_text())
            for item in args.params_set:
                key, value = item.split("=", 1)
                *parents, leaf = key.split(".")
                node = params
                for p in parents:
                    node = node[p]
                node[leaf] = yaml.safe_load(value)
            (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        # --force: a fresh clone already has the committed metrics, which DVC would rightly keep
        rows = [(stage, timed(["dvc", "repro", "--force", "--single-item", stage], repo, env)) for stage in ORDER]
        total = sum(t for _, t in rows)
        noop = timed(["dvc", "repro"], repo, env)
        subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qam", "bench"], cwd=repo, env=env, capture_output=True)
        alpha = timed(["dvc", "exp", "run", "-S", "alpha=0.3"], repo, env)
    print("| stage | seconds |\n|---|---|")
    for stage, t in rows:
        print(f"| {stage} | {t:.1f} |")
    print(f"| **full pipeline** | **{total:.1f}** |")
    print(f"| no-op `dvc repro` | {noop:.1f} |")
    print(f"| `dvc exp run -S alpha=0.3` | {alpha:.1f} |")


if __name__ == "__main__":
    main()
