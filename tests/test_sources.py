"""Where models come from: a pre-filled Hugging Face cache (offline) and local directories."""

from __future__ import annotations

import json
import os

import pytest

from helpers import make_tiny_llama
from mergeflow.params import Params
from mergeflow.zoo.sources import materialise

SHA = "0123456789abcdef0123456789abcdef01234567"


def fill_hub_cache(cache, repo_id, model_dir, commit=SHA):
    """Lay `model_dir` out as huggingface_hub does at `commit`: blobs/, snapshots/<commit>/ links, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    for folder in (repo / "refs", snap, repo / "blobs"):
        folder.mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for i, f in enumerate(sorted(model_dir.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        blob.write_bytes(f.read_bytes())
        os.symlink(os.path.relpath(blob, snap), snap / f.name)


def data_params(tmp_path, experts):
    for e in experts:
        (tmp_path / f"{e}.calib.jsonl").write_text('{"text": "1+1=2"}\n')
        (tmp_path / f"{e}.eval.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    (tmp_path / "test.csv").write_text("id,input,eval_type,answer_choices\n0,1+1=,generation,\n")
    return {
        "calib": {e: str(tmp_path / f"{e}.calib.jsonl") for e in experts},
        "eval": {e: str(tmp_path / f"{e}.eval.jsonl") for e in experts},
        "test_csv": str(tmp_path / "test.csv"),
    }


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    for i, name in enumerate(["org/base", "org/math", "org/code"]):
        fill_hub_cache(cache, name, make_tiny_llama(tmp_path / "src" / name, seed=i))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return cache


def hub_params(tmp_path, **experts):
    return Params.model_validate({
        "experts": list(experts),
        "models": {"source": "hub", "hub": {"base": {"repo_id": "org/base"}, "experts": {e: {"repo_id": r} for e, r in experts.items()}}},
        "data": data_params(tmp_path, list(experts)),
    })


def test_hub_source_resolves_a_prefilled_cache_offline(hub_cache, tmp_path, caplog):
    params = hub_params(tmp_path, math="org/math", code="org/code")
    materialise(params, tmp_path / "models", tmp_path / "data")
    assert "params.yaml: models.hub.experts.code.revision 'main' is a moving ref, DVC cannot tell when it moves; `mergeflow use params.yaml` pins it to its commit" in caplog.messages
    for name, src in [("base", "org/base"), ("experts/math", "org/math"), ("experts/code", "org/code")]:
        out = tmp_path / "models" / name
        assert (out / "model.safetensors").read_bytes() == (tmp_path / "src" / src / "model.safetensors").read_bytes()
        assert not (out / "model.safetensors").is_symlink()
        assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert sorted(p.name for p in (tmp_path / "data" / "calib").iterdir()) == ["code.jsonl", "math.jsonl"]
    assert (tmp_path / "data" / "test.csv").is_file()


def test_hub_source_names_the_missing_repo_and_the_fix(hub_cache, tmp_path):
    params = hub_params(tmp_path, math="org/math", code="org/absent")
    with pytest.raises(FileNotFoundError, match=r"org/absent@main is not in the Hugging Face cache.*hf download org/absent --revision main"):
        materialise(params, tmp_path / "models", tmp_path / "data")


def test_local_source_links_directories(experts, tmp_path):
    params = Params.model_validate({
        "experts": ["a", "b"],
        "models": {"source": "local", "local": {"base": str(experts[0]), "experts": {"a": str(experts[0]), "b": str(experts[1])}}},
        "data": data_params(tmp_path, ["a", "b"]),
    })
    materialise(params, tmp_path / "models", tmp_path / "data")
    assert (tmp_path / "models/experts/b/model.safetensors").read_bytes() == (experts[1] / "model.safetensors").read_bytes()
    assert (tmp_path / "data/eval/a.jsonl").is_file()


def test_local_source_without_data_names_the_parameter(experts, tmp_path):
    from pydantic import ValidationError

    raw = {"experts": ["a"], "models": {"source": "local", "local": {"base": str(experts[0]), "experts": {"a": str(experts[0])}}}}
    with pytest.raises(ValidationError, match=r"data\.calib must give a calibration file for every expert .* missing: \['a'\]"):
        Params.model_validate(raw)
    params = Params.model_validate({**raw, "data": {"calib": {"a": str(tmp_path / "absent.jsonl")}}})
    with pytest.raises(FileNotFoundError, match=r"absent\.jsonl: not found \(params\.yaml: data\.calib\.a\)"):
        materialise(params, tmp_path / "models", tmp_path / "data")
