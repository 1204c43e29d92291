"""Trials as DVC experiments: `dvc exp run --temp --name NAME -S key=value ...`, and their results.

A temporary-directory experiment leaves the workspace alone and is recorded under the current
commit (`dvc exp show`, `dvc plots diff`), with its outputs in DVC's cache; stages whose inputs
did not change (downloads, grams, reference evaluations) are skipped or restored from the run
cache, so a trial costs only what its params change: merge, evaluate, summary, submit.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

SUMMARY = "metrics/summary.json"


def dvc_command() -> str:
    """The `dvc` of this environment (beside this Python), else the one on PATH."""
    local = Path(sys.executable).with_name("dvc")
    return str(local) if local.exists() else (shutil.which("dvc") or "dvc")


def override(key: str, value: Any) -> str:
    """`key=value` in the override grammar of `dvc exp run -S` (Hydra's): numbers as written,
    strings quoted, lists in brackets."""
    return f"{key}={_literal(value)}"


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_literal(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def git(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=check)


def head_commit(root: Path) -> str:
    proc = git(root, "rev-parse", "HEAD", check=False)
    if proc.returncode != 0:
        raise ValueError(f"{root.resolve()}: not a git repository with a commit; tune runs DVC experiments, which start from a commit")
    return proc.stdout.strip()


def experiment_ref(baseline: str, name: str) -> str:
    """The git ref DVC keeps experiment `name` of commit `baseline` under."""
    from dvc.repo.experiments.refs import ExpRefInfo

    return str(ExpRefInfo(baseline_sha=baseline, name=name))


def experiment_names(root: Path, baseline: str) -> list[str]:
    """Names of the experiments recorded under commit `baseline`."""
    prefix = experiment_ref(baseline, "x")[:-1]
    out = git(root, "for-each-ref", "--format=%(refname)", prefix).stdout.split()
    return [ref[len(prefix):] for ref in out]


def read_summary(root: Path, baseline: str, name: str) -> Optional[dict]:
    """`metrics/summary.json` of experiment `name`, or None when there is no such experiment."""
    proc = git(root, "show", f"{experiment_ref(baseline, name)}:{SUMMARY}", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def run_experiment(root: Path, name: str, overrides: Sequence[str], log_file: Path, target: Optional[str] = None) -> tuple[bool, str]:
    """Run one DVC experiment in a temporary directory (up to stage `target`, or the whole
    pipeline); its output goes to `log_file`. Returns (succeeded, the last error line or line)."""
    cmd = [dvc_command(), "exp", "run", "--temp", "--name", name]
    for item in overrides:
        cmd += ["-S", item]
    if target:
        cmd.append(target)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, cwd=root, stdout=fh, stderr=subprocess.STDOUT, check=False)
    lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    own = [line for line in lines if ": error: " in line]  # a stage's one-line error says why; DVC's ERROR line only that it failed
    dvc = [line for line in lines if line.startswith("ERROR")]
    return proc.returncode == 0, (own or dvc or lines or [""])[-1]


def score(summary: Mapping[str, Any], tasks: Mapping[str, str], name: str) -> dict[str, float]:
    """`summary.merged.<task>.<metric>` for each of `tasks` (task -> metric)."""
    merged = summary.get("merged") or {}
    values = {}
    for task, metric in tasks.items():
        value = (merged.get(task) or {}).get(metric)
        if not isinstance(value, (int, float)):
            have = ", ".join(f"{t}.{m}" for t, ms in merged.items() for m in (ms or {})) or "nothing"
            raise ValueError(f"experiment {name}: {SUMMARY} has no merged.{task}.{metric} (it has {have}); fix tune.objective / tune.held_out")
        values[task] = float(value)
    return values
