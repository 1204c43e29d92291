"""The params a stage reads but dvc.yaml leaves out (params.RUN_ONLY) change how the stage runs,
never what it writes: the gram stage, run as DVC runs it, writes the same bytes for any value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mergeflow.params import RUN_ONLY

ROOT = Path(__file__).resolve().parents[1]
# A value other than the shipped one for each run-only key: a checkpoint after every batch, and a
# cap that forces one pass over the data per layer.
OTHER_VALUES = {"gram.checkpoint_every": 1, "gram.max_gram_memory": "6KB"}


def gram_stage(tmp_path: Path, model: Path, calib: Path, name: str, **changes) -> dict[str, bytes]:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["gram"].update(max_length=16, batch_size=3)
    for key, value in changes.items():
        params["gram"][key.removeprefix("gram.")] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(params))
    out = tmp_path / name
    proc = subprocess.run([sys.executable, str(ROOT / "stages/gram.py"), "--params", str(path), "--model", str(model), "--data", str(calib), "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_every_run_only_key_has_a_value_to_try():
    assert set(OTHER_VALUES) == set(RUN_ONLY["gram"]) and set(RUN_ONLY) == {"gram"}


@pytest.fixture(scope="module")
def reference(experts, calib_file, tmp_path_factory) -> dict[str, bytes]:
    return gram_stage(tmp_path_factory.mktemp("reference"), experts[0], calib_file, "reference")


@pytest.mark.parametrize("key", sorted(OTHER_VALUES))
def test_run_only_gram_keys_write_the_same_bytes(experts, calib_file, tmp_path, reference, key):
    assert gram_stage(tmp_path, experts[0], calib_file, "other", **{key: OTHER_VALUES[key]}) == reference
