"""Fisher merging: the diagonal Fisher against per-example gradients taken by hand (torch.func),
the merge against the hand-computed Fisher-weighted average, and the no-op marker."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import state
from torch.func import functional_call, grad
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergeflow.fisher import FISHER_METHODS, needs_fisher
from mergeflow.fisher.compute import compute_fisher
from mergeflow.fisher.format import FisherDir, write_marker
from mergeflow.grams.data import load_rows, tokenize
from mergeflow import merge
from mergeflow.merge import merge_models
from mergeflow.methods import available, get_method


def hand_fisher(expert, calib_file, max_length=16) -> dict[str, torch.Tensor]:
    """mean over rows of (d log p(row) / d theta)^2, in float64, one row at a time with
    torch.func.grad (the library vmaps over rows of one length)."""
    model = AutoModelForCausalLM.from_pretrained(expert, dtype=torch.float64).eval()
    rows = tokenize(load_rows(calib_file), AutoTokenizer.from_pretrained(expert), max_length)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def log_p(p, ids):  # (HF's own `labels=` loss computes in float32: log-softmax here, in float64)
        logits = functional_call(model, p, args=(), kwargs={"input_ids": ids}).logits[0, :-1]
        return torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).sum()

    rows = [ids for ids in rows if len(ids) > 1]  # a one-token row predicts nothing: left out
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for ids in rows:
        g = grad(log_p)(params, torch.tensor([ids]))
        for k in total:
            total[k] += g[k] ** 2
    return {k: v / len(rows) for k, v in total.items()}


@pytest.fixture(scope="module")
def hand(experts, calib_file):
    return [hand_fisher(e, calib_file) for e in experts]


@pytest.fixture(scope="module")
def fisher_dirs(experts, calib_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("fisher")
    for i, e in enumerate(experts):
        compute_fisher(e, calib_file, root / f"f{i}", max_length=16, model_dtype="float64", dtype="float64")
    return [root / f"f{i}" for i in range(len(experts))]


def test_fisher_is_the_mean_squared_per_example_gradient(hand, fisher_dirs):
    expected = hand[0]
    stored = FisherDir.open(fisher_dirs[0])
    assert sorted(stored.tensors) == sorted(expected)  # untied: every parameter, lm_head included
    meta = json.loads((fisher_dirs[0] / "fisher.json").read_text())
    assert meta["num_examples"] == 6 and meta["estimator"] == "empirical" and meta["dtype"] == "float64"
    # float64 models still run RMSNorm and the rotary embeddings in float32 (transformers), and the
    # library's vmapped eager attention rounds differently: agreement to float32 rounding
    for name, value in expected.items():
        torch.testing.assert_close(stored.get(name), value, rtol=2e-5, atol=1e-12)
    assert float(stored.get("model.layers.1.mlp.down_proj.weight").min()) >= 0
    assert float(stored.get("model.layers.1.mlp.down_proj.weight").max()) > 0


def test_fisher_merge_is_the_fisher_weighted_average(experts, hand, fisher_dirs, tmp_path):
    weights = (0.3, 0.7)
    method = get_method("fisher")({"weights": list(weights), "fisher_floor": 1e-6})
    config = merge_models(experts, method, tmp_path / "m", fisher=fisher_dirs)
    assert config["method"] == "fisher" and config["fisher_floor"] == 1e-6 and config["fisher"] == [str(p) for p in fisher_dirs]
    merged, thetas = state(tmp_path / "m"), [state(e) for e in experts]
    fishers = hand
    for name, out in merged.items():
        f = [fi[name].clamp_min(1e-6) * w for fi, w in zip(fishers, weights)]
        expected = (f[0] * thetas[0][name].double() + f[1] * thetas[1][name].double()) / (f[0] + f[1])
        torch.testing.assert_close(out.double(), expected, rtol=2e-6, atol=1e-7)
    # embeddings of tokens no calibration row holds: F = 0 for both experts -> the weighted average
    emb = "model.embed_tokens.weight"
    unseen = int((fishers[0][emb].sum(1) == 0).nonzero()[0])
    torch.testing.assert_close(merged[emb][unseen], 0.3 * thetas[0][emb][unseen] + 0.7 * thetas[1][emb][unseen])
    # and different from plain averaging where the Fisher differs
    assert not torch.allclose(merged["model.layers.0.mlp.up_proj.weight"], 0.3 * thetas[0]["model.layers.0.mlp.up_proj.weight"] + 0.7 * thetas[1]["model.layers.0.mlp.up_proj.weight"])


def test_fisher_merge_streamed_in_tiny_row_blocks_equals_whole_tensors(experts, fisher_dirs, tmp_path, monkeypatch):
    method = lambda: get_method("fisher")({"weights": [0.3, 0.7]})  # noqa: E731
    merge_models(experts, method(), tmp_path / "whole", fisher=fisher_dirs)
    real, blocks = merge.stream_blocks, {}
    monkeypatch.setattr(merge, "stream_blocks", lambda spec, m, inputs: blocks.setdefault(spec.name, real(spec, m, inputs)))
    monkeypatch.setattr(merge, "STREAM_BYTES", 2048)  # the embedding and every Linear in many blocks of rows, each with its Fisher's rows
    merge_models(experts, method(), tmp_path / "blocks", fisher=fisher_dirs)
    assert len(blocks["model.embed_tokens.weight"]) > 10
    whole, streamed = state(tmp_path / "whole"), state(tmp_path / "blocks")
    assert all(torch.equal(streamed[name], whole[name]) for name in whole)  # elementwise: the same bytes


def test_one_expert_weighted_fully_returns_it(experts, fisher_dirs, tmp_path):
    merge_models(experts, get_method("fisher")({"weights": [1.0, 0.0]}), tmp_path / "m", fisher=fisher_dirs)
    for name, value in state(tmp_path / "m").items():  # (w F theta) / (w F): theta to one rounding
        torch.testing.assert_close(value, state(experts[0])[name], rtol=2.4e-7, atol=0, msg=name)


def test_a_marker_is_refused_by_the_merge_in_one_line(experts, fisher_dirs, tmp_path):
    write_marker(tmp_path / "f1", "method 'regmean' reads no Fisher")
    assert json.loads((tmp_path / "f1" / "fisher.json").read_text()) == {"format": "mergeflow.fisher/1", "skipped": "method 'regmean' reads no Fisher", "tensors": {}, "files": {}}
    with pytest.raises(ValueError, match=r"f1: holds no Fisher \(method 'regmean' reads no Fisher\); compute it: `dvc repro fisher`"):
        merge_models(experts, get_method("fisher")(), tmp_path / "m", fisher=[fisher_dirs[0], tmp_path / "f1"])
    assert not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match=r"f1: the Fisher of another model, not of .*expert0; list the Fisher directories in the order of the experts"):
        merge_models(experts, get_method("fisher")(), tmp_path / "m", fisher=list(reversed(fisher_dirs)))


def test_needs_fisher_knows_every_registered_method_without_torch():
    assert sorted(n for n in available() if getattr(get_method(n), "uses_fisher", False)) == sorted(FISHER_METHODS)
    assert needs_fisher("fisher") and not needs_fisher("regmean") and not needs_fisher("regmean_pp")


def test_the_stage_writes_a_marker_for_other_methods_without_loading_the_model(tmp_path):
    """fisher@<expert> costs the pipeline next to nothing unless method is fisher: a marker, and
    no model is read (the expert and data paths need not even exist)."""
    import subprocess
    import sys

    from helpers import ROOT

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())  # method: regmean
    driver = ("import runpy, sys; sys.argv = ['fisher.py', '--model', 'models/experts/math', '--data', 'data/calib/math.jsonl', "
              f"'--out', 'models/fisher/math']; runpy.run_path({str(ROOT / 'stages' / 'fisher.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", driver], cwd=tmp_path, capture_output=True, text=True, env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "models/fisher/math/fisher.json").read_text()) == {
        "format": "mergeflow.fisher/1", "skipped": "method 'regmean' reads no Fisher", "tensors": {}, "files": {}}
