"""Tiny random Llama models for tests (hidden 16, 2 layers, grouped-query attention), DVC
pipeline runs in temporary copies of the repository, and what the fault tests share (snapshots of
outputs, bytes lost, SIGKILL at a fault point, in-process CLI runs, the properties they report)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from mergeflow.zoo.tokenizer import build_tokenizer


def make_tiny_llama(path: Path, seed: int, *, hidden: int = 16, layers: int = 2, intermediate: int = 24, tie: bool = False) -> Path:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(64)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return save_with_random_norms(LlamaForCausalLM(config), tokenizer, path, "norm")


def save_with_random_norms(model, tokenizer, path: Path, norm_key: str) -> Path:
    """Save a freshly built tiny model and its tokenizer, its norm weights (parameters whose name
    holds `norm_key`) drawn in [0.5, 1.5] first: random norms too, so averaging them is a real test."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if norm_key in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


# --- DVC pipeline runs in temporary copies of the repository (test_pipeline.py, test_remotes.py) ---

ROOT = Path(__file__).resolve().parents[1]
# A toy zoo small enough that the whole pipeline runs in about a minute on 2 cores.
TINY_TOY = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "batch_size": 16, "base_steps": 10, "expert_steps": 10, "calib_samples": 32, "eval_samples": 8, "test_rows": 4}


def dvc_env() -> dict[str, str]:
    """The environment for `git` and `dvc` subprocesses: this venv's `dvc` first, a git identity."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def run(cmd: list[str], cwd: Path, env: dict, *, ok: bool = True) -> str:
    """Run `cmd` and return its stdout and stderr; fail the test with both when it fails (or, with
    `ok=False`, when it succeeds)."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert (proc.returncode == 0) == ok, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def ran(output: str) -> set[str]:
    """Stages that `dvc repro` / `dvc exp run` ran, from its output."""
    return set(re.findall(r"Running stage '([^']+)'", output))


def skipped(output: str) -> set[str]:
    """Stages that `dvc repro` / `dvc exp run` found unchanged, from its output."""
    return set(re.findall(r"Stage '([^']+)' didn't change, skipping", output))


def dvc_init_local(dest: Path, env: dict, site_cache: Path) -> None:
    """Settings local to one test repository: its own site cache, no analytics."""
    run(["dvc", "config", "--local", "core.site_cache_dir", str(site_cache)], dest, env)
    run(["dvc", "config", "--local", "core.analytics", "false"], dest, env)


def copy_repo(dest: Path, site_cache: Path, toy: dict | None = None) -> dict[str, str]:
    """Copy this repository's working tree (without what git ignores) into `dest` as a new git
    repository (one commit) with its own DVC cache and site cache, and the toy zoo shrunk by `toy`;
    return the env to run `git` and `dvc` in it."""
    # tracked and new (not ignored) files: the working tree as it is, a clean checkout in CI
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["models"]["toy"].update(TINY_TOY if toy is None else toy)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dvc_env()
    run(["git", "init", "-q"], dest, env)
    dvc_init_local(dest, env, site_cache)
    run(["git", "add", "-A"], dest, env)
    run(["git", "commit", "-qm", "copy"], dest, env)
    return env


# --- fault tests (issue 14: tests marked `faults`) ------------------------------------------------

def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under `path` (relative name -> bytes); {path.name: bytes} for a file, {} when absent."""
    path = Path(path)
    if not path.is_dir():
        return {path.name: path.read_bytes()} if path.is_file() else {}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def bytes_lost(before: dict[str, bytes], path: Path) -> int:
    """Bytes of `before` (an earlier good output, or the bytes it should hold) missing or changed at `path`."""
    after = snapshot(path)
    return sum(len(data) for name, data in before.items() if after.get(name) != data)


def report(record_property, fault: str, outcome: str, lost: int = 0) -> None:
    """The three properties `benchmarks/faults.py` tabulates (fault, outcome, bytes lost)."""
    record_property("fault", fault)
    record_property("outcome", outcome)
    record_property("bytes_lost", lost)


def dead_pid() -> int:
    """The PID of a process that has just exited (nothing runs under it)."""
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def killed_at(point: str, args: list[str]) -> subprocess.CompletedProcess:
    """Run `mergeflow ARGS` in a subprocess that SIGKILLs itself at fault point `point`; assert it did."""
    env = {**os.environ, "MERGEFLOW_FAULT": f"{point}:kill", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "mergeflow", *args], env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    return proc


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """Run `mergeflow ARGS` in this process (no interpreter start-up); return its exit code and stderr."""
    from mergeflow.cli import run

    capsys.readouterr()  # only what this command prints
    argv = sys.argv
    sys.argv = ["mergeflow", *args]
    code = 0
    try:
        run()
    except SystemExit as exit_:
        code = exit_.code
    finally:
        sys.argv = argv
    return code, capsys.readouterr().err


def refused(args: list[str], capsys, victim: Path, message: str) -> int:
    """Run `mergeflow ARGS` in this process; assert that it exits 1 printing the one line `message`
    and leaves `victim` as it was; return the bytes lost (for `report`)."""
    before = snapshot(victim)
    code, err = run_cli(args, capsys)
    assert (code, err) == (1, f"mergeflow: error: {message}\n")
    assert snapshot(victim) == before
    return bytes_lost(before, victim)


@contextmanager
def input_grams(linears: dict[str, torch.nn.Module]):
    """Sums of x x^T of each module's inputs over the forward passes run inside the block (the
    direct computation the gram tests compare with); yields the dict they accumulate in."""
    sums: dict[str, torch.Tensor] = {}

    def add(name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        sums[name] = sums.get(name, 0) + x.T @ x

    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: add(name, args[0])) for name, m in linears.items()]
    try:
        yield sums
    finally:
        for h in hooks:
            h.remove()
