"""The stages pin the CPU kernels themselves (`mergeflow.determinism`), so that a zoo, its grams and
a merge come out with the same bytes on another CPU and thread count (issue 19, README
"Reproducibility"). Another CPU is simulated: fewer threads, MKL and oneDNN held to AVX2, ATen's
AVX2 kernels."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, TINY_TOY
from mergeflow.determinism import PINNED_ENV

# The download, gram and merge stage scripts, run as DVC runs them but in one process (one import
# of torch instead of four); the first one's `import mergeflow.pinned` pins the kernels.
DRIVER = """
import runpy, sys
stages, experts = sys.argv[1], ["math", "code"]
runs = [["download.py", "base"], *(["download.py", "expert", e] for e in experts), ["download.py", "eval"]]
runs += [["gram.py", "--model", f"models/experts/{e}", "--data", f"data/calib/{e}.jsonl", "--out", f"models/grams/{e}"] for e in experts]
runs += [["merge.py", "--experts", "models/experts", "--grams", "models/grams", "--base", "models/base", "--out", "models/merged"]]
for argv in runs:
    sys.argv = [f"{stages}/{argv[0]}", *argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""
CPU_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_CBWR", "MERGEFLOW_BITWISE")
THIS_CPU = {"OMP_NUM_THREADS": "2"}
AVX2_CPU_ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
# The default toy shapes (hidden 128, intermediate 256: MKL threads the merge's 256 x 256
# Cholesky, which TINY_TOY's are too small for) with TINY_TOY's few steps and samples.
ZOO = {**TINY_TOY, "hidden_size": 128, "intermediate_size": 256, "base_steps": 4, "expert_steps": 4, "calib_samples": 16}


def env_for(cpu: dict[str, str], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CPU_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **cpu, **extra}


def start(work: Path, env: dict[str, str]) -> subprocess.Popen:
    work.mkdir()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["models"]["toy"].update(ZOO)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(ROOT / "stages")], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def outputs(work: Path, proc: subprocess.Popen) -> dict[str, str]:
    """sha256 of every file the stages wrote under `work` (after checking that they succeeded)."""
    log = proc.communicate()[0]
    assert proc.returncode == 0, log[-3000:]
    files = {str(f.relative_to(work)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(work.rglob("*")) if f.is_file()}
    assert {"models/base/model.safetensors", "models/grams/math/grams.json", "models/merged/model.safetensors", "data/test.csv"} <= files.keys()
    return files


def two_cpus(tmp_path: Path, **extra: str) -> tuple[dict[str, str], dict[str, str]]:
    """The zoo, grams and merge on this CPU with 2 threads and on a simulated AVX2 CPU with 1."""
    a = start(tmp_path / "this-cpu", env_for(THIS_CPU, **extra))
    b = start(tmp_path / "avx2-cpu", env_for(AVX2_CPU_ONE_THREAD, **extra))
    return outputs(tmp_path / "this-cpu", a), outputs(tmp_path / "avx2-cpu", b)


def test_zoo_grams_and_merge_are_bit_identical_on_another_cpu_and_thread_count(tmp_path):
    this_cpu, other_cpu = two_cpus(tmp_path)
    assert this_cpu == other_cpu


def test_without_the_pin_the_same_two_runs_differ(tmp_path):
    """What the pin is for: on this CPU (AVX-512) the unpinned runs do not agree even on the zoo."""
    this_cpu, other_cpu = two_cpus(tmp_path, MERGEFLOW_BITWISE="0")
    differ = sorted(name for name in this_cpu if this_cpu[name] != other_cpu.get(name))
    assert "models/base/model.safetensors" in differ
    assert "models/merged/model.safetensors" in differ


PROBE = "import torch, mergeflow.pinned, os; print(os.environ.get('ATEN_CPU_CAPABILITY'), torch.backends.cpu.get_cpu_capability())"


def test_a_process_that_imported_torch_first_restarts_once_pinned(tmp_path):
    """`import torch` before the pin: too late for ATen, so the process starts again with it."""
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env_for(THIS_CPU), capture_output=True, text=True, check=True)
    assert proc.stdout.split() == [PINNED_ENV["ATEN_CPU_CAPABILITY"], "AVX2"]


def test_opting_out_warns_and_leaves_the_kernels_to_the_machine(tmp_path):
    env = env_for(THIS_CPU, MERGEFLOW_BITWISE="0", ATEN_CPU_CAPABILITY="default")
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["default", "DEFAULT"]
    assert proc.stderr == "mergeflow: MERGEFLOW_BITWISE=0: CPU kernels not pinned; outputs may differ from dvc.lock on another CPU or thread count\n"


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "stages").glob("*.py")))
def test_every_stage_script_pins_before_anything_else(script):
    """The pin must run before any import that may load torch: it is each stage's first statement."""
    lines = (ROOT / "stages" / script).read_text().split('"""', 2)[2].lstrip().splitlines()
    assert lines[0].startswith("import mergeflow.pinned")
