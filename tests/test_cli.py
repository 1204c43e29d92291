"""The `mergeflow` command line as a user runs it: help, a full grams+merge, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mergeflow(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "mergeflow", *map(str, args)], capture_output=True, text=True)
    if check and proc.returncode:
        raise AssertionError(proc.stderr)
    return proc


def listed_commands(help_text: str) -> list[str]:
    """The command names of a click group's help: the first word of each line under `Commands:`."""
    section = help_text.split("\nCommands:\n", 1)[1]
    return [line.split()[0] for line in section.splitlines() if line.startswith("  ") and not line.startswith("   ")]


def test_help_lists_the_commands():
    listed = listed_commands(mergeflow("--help").stdout)
    assert {"evaluate", "grams", "merge", "methods", "plan", "report", "submit", "use"} <= set(listed)
    assert "--max-length" in mergeflow("grams", "compute", "--help").stdout
    assert listed_commands(mergeflow("grams", "--help").stdout) == ["compute", "import", "sum", "verify"]


def test_evaluate_help_names_every_shipped_task():
    from mergeflow.evaluation.tasks import TASK_DIR

    text = " ".join(mergeflow("evaluate", "--help").stdout.split())
    shipped = sorted(p.stem for p in TASK_DIR.glob("*.yaml"))
    assert f"(shipped: {', '.join(shipped)}; or any lm-eval task)" in text


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
    known = "average, breadcrumbs, breadcrumbs_ties, dare_linear, dare_ties, della, della_linear, fisher, karcher, model_stock, nuslerp, regmean, regmean_pp, sce, slerp, task_arithmetic, ties"
    assert proc.stderr.strip() == f"mergeflow: error: unknown merge method 'frankenmerge'; available: {known}, or path/to/file.py:ClassName. (--method)"
    proc = mergeflow("merge", "--method", "regmean", "--alpha", "2", "--model", experts[0], "--model", experts[1], "--out", tmp_path / "m", check=False)
    assert proc.returncode == 1 and "alpha must be in [0, 1], got 2.0" in proc.stderr
    proc = mergeflow("grams", "--model", experts[0], "--data", tmp_path / "none.jsonl", "--out", tmp_path / "g", check=False)
    assert proc.returncode == 1 and "none.jsonl: calibration data file not found" in proc.stderr
    assert not (tmp_path / "m").exists() and not (tmp_path / "g").exists()


def test_code_execution_refusal_names_each_edges_own_switch(experts, tmp_path):
    """The library refuses; the CLI names its option and the DVC stage its params key."""
    import yaml

    refused = "tasks ['humaneval_instruct_fence'] execute model-written code and code execution is not allowed"
    proc = mergeflow("evaluate", "--model", experts[0], "--task", "humaneval_instruct_fence", "--out", tmp_path / "m.json", check=False)
    assert (proc.returncode, proc.stderr.strip()) == (1, f"mergeflow: error: {refused}: pass --allow-code-execution to run them")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["eval"]["tasks"] = ["humaneval_instruct_fence"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    stage = [sys.executable, str(ROOT / "stages/evaluate.py"), "--model", str(experts[0]), "--out", "m.json", "--logs", "logs"]
    proc = subprocess.run(stage, cwd=tmp_path, capture_output=True, text=True)
    assert (proc.returncode, proc.stderr.strip().splitlines()[-1]) == (1, f"evaluate.py: error: {refused}: set eval.allow_code_execution: true in params.yaml to run them")
    assert not (tmp_path / "m.json").exists()
