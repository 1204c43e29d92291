"""Shared fixtures: offline Hugging Face, tiny random Llama experts built once per session."""

from __future__ import annotations

# Before anything imports torch: the tests compute with the CPU kernels that the stages and the
# `mergeflow` command pin, so that in-process results equal theirs bit for bit (README "Reproducibility").
import mergeflow.pinned  # noqa: F401, I001

import os
import tempfile
from pathlib import Path

import pytest

# Never touch the network or the user's caches from the tests.
_HF_HOME = tempfile.mkdtemp(prefix="mergeflow-test-hf-")
os.environ.update(HF_HOME=_HF_HOME, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
# `make test` runs two xdist workers on two cores: one thread each, in-process and in the stages they
# start (the pinned kernels give the same bytes at any thread count; test_determinism sets its own).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from helpers import make_tiny_llama  # noqa: E402


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """Under `pytest -n N --dist loadgroup` the tests sharing the one pipeline run stay on one worker."""
    for item in items:
        if "pipeline_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("pipeline"))


@pytest.fixture(scope="session")
def experts(tmp_path_factory) -> list[Path]:
    """Two tiny random Llamas of one architecture (different seeds), saved as HF directories."""
    root = tmp_path_factory.mktemp("experts")
    return [make_tiny_llama(root / f"expert{i}", seed=i) for i in range(2)]


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    """Calibration JSONL whose texts differ in length, so batches carry padding."""
    import json

    path = tmp_path_factory.mktemp("data") / "calib.jsonl"
    texts = ["12+5=17", "rev(abc)=cba", "cp(x)=x", "9+9=18 and more text here", "a", "hello world 123", "rev(hgfedcba)=abcdefgh"]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="session")
def gram_dirs(experts, calib_file, tmp_path_factory) -> list[Path]:
    from mergeflow.grams.collect import compute_grams
    from mergeflow.params import GramParams

    root = tmp_path_factory.mktemp("grams")
    outs = [root / f"g{i}" for i in range(len(experts))]
    for expert, out in zip(experts, outs):
        compute_grams(expert, calib_file, out, GramParams(max_length=16, batch_size=3))
    return outs


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory) -> tuple[Path, dict, str]:
    """One `dvc repro` of a tiny toy zoo in a temporary copy of the repository, committed to git.

    test_pipeline.py runs its experiments in it; test_remotes.py clones its commit and reads its
    cache, so the whole pipeline runs once per test session. Returns (path, env, repro output).
    """
    from helpers import copy_repo, run

    dest = tmp_path_factory.mktemp("repo")
    env = copy_repo(dest, tmp_path_factory.mktemp("site-cache"))
    out = run(["dvc", "repro"], dest, env)
    run(["git", "add", "-A"], dest, env)
    run(["git", "commit", "-qm", "repro"], dest, env)
    return dest, env, out
