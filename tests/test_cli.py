"""The `mergeflow` command line as a user runs it: help, a full grams+merge, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys


def mergeflow(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "mergeflow", *map(str, args)], capture_output=True, text=True)
    if check and proc.returncode:
        raise AssertionError(proc.stderr)
    return proc


def test_help_lists_the_commands():
    out = mergeflow("--help").stdout
    for command in ("grams", "merge", "evaluate", "submit", "methods"):
        assert command in out
    assert "--max-length" in mergeflow("grams", "compute", "--help").stdout
    assert all(sub in mergeflow("grams", "--help").stdout for sub in ("compute", "sum", "import", "verify"))


def test_grams_then_merge(experts, calib_file, tmp_path):
    for i, e in enumerate(experts):
        mergeflow("grams", "--model", e, "--data", calib_file, "--out", tmp_path / f"g{i}", "--max-length", 8)
    mergeflow("merge", "--method", "regmean", "--alpha", "0.3", "--model", experts[0], "--model", experts[1],
              "--gram", tmp_path / "g0", "--gram", tmp_path / "g1", "--out", tmp_path / "m")
    config = json.loads((tmp_path / "m" / "mergeflow_merge.json").read_text())
    assert config["alpha"] == 0.3 and config["solved_modules"] == 14
    again = mergeflow("merge", "--method", "average", "--model", experts[0], "--model", experts[1], "--out", tmp_path / "m", check=False)
    assert again.returncode == 1 and again.stderr.strip().endswith(f"{tmp_path / 'm'} already holds a merged model; pass --force to replace it")
    mergeflow("merge", "--method", "average", "--model", experts[0], "--model", experts[1], "--out", tmp_path / "m", "--force")
    assert json.loads((tmp_path / "m" / "mergeflow_merge.json").read_text())["method"] == "average"


def test_errors_are_one_clear_line(experts, tmp_path):
    proc = mergeflow("merge", "--method", "frankenmerge", "--model", experts[0], "--model", experts[1], "--out", tmp_path / "m", check=False)
    assert proc.returncode == 1
    known = "average, breadcrumbs, breadcrumbs_ties, dare_linear, dare_ties, della, della_linear, karcher, model_stock, nuslerp, regmean, sce, slerp, task_arithmetic, ties"
    assert proc.stderr.strip() == f"mergeflow: error: unknown merge method 'frankenmerge'; available: {known}, or path/to/file.py:ClassName. (params.yaml: method, or --method)"
    proc = mergeflow("merge", "--method", "regmean", "--alpha", "2", "--model", experts[0], "--model", experts[1], "--out", tmp_path / "m", check=False)
    assert proc.returncode == 1 and "alpha must be in [0, 1], got 2.0" in proc.stderr
    proc = mergeflow("grams", "--model", experts[0], "--data", tmp_path / "none.jsonl", "--out", tmp_path / "g", check=False)
    assert proc.returncode == 1 and "none.jsonl: calibration data file not found" in proc.stderr
    assert not (tmp_path / "m").exists() and not (tmp_path / "g").exists()
