"""RegMean++ against a direct, unstreamed float64 implementation (whole-model forwards row by row,
full X^T X, a dense solve), streamed hidden states against in-memory ones, and one expert."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import state
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergeflow.grams.data import load_rows, tokenize
from mergeflow.merge import merge_models
from mergeflow.methods import get_method
from mergeflow.regmean_pp import Calibration, merge_regmean_pp

ALPHA, WEIGHTS = 0.7, (0.4, 0.6)


def direct_regmean_pp(experts, calib, alpha, weights, max_length=16):
    models = [AutoModelForCausalLM.from_pretrained(e, dtype=torch.float64).eval() for e in experts]
    merged = AutoModelForCausalLM.from_pretrained(experts[0], dtype=torch.float64).eval()
    rows = [[torch.tensor([ids]) for ids in tokenize(load_rows(c), AutoTokenizer.from_pretrained(e), max_length)] for e, c in zip(experts, calib)]
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    target = dict(merged.named_parameters())
    sources = [dict(m.named_parameters()) for m in models]
    with torch.no_grad():
        for name, p in target.items():  # everything averaged first; layers are overwritten below
            p.copy_(sum(wi * s[name] for wi, s in zip(w, sources)))
        for layer in range(merged.config.num_hidden_layers):
            own = {k: v.clone() for k, v in merged.model.layers[layer].state_dict().items()}  # the merged layer's averaged tensors
            grams = []
            for i, model in enumerate(models):
                merged.model.layers[layer].load_state_dict(model.model.layers[layer].state_dict())
                sums, count = {}, 0
                linears = {n: m for n, m in merged.model.layers[layer].named_modules() if isinstance(m, torch.nn.Linear)}
                hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: sums.__setitem__(n, sums.get(n, 0) + a[0][0].T @ a[0][0])) for n, m in linears.items()]
                for ids in rows[i]:
                    merged(input_ids=ids)
                    count += ids.shape[1]
                for h in hooks:
                    h.remove()
                grams.append({n: g / count for n, g in sums.items()})
            merged.model.layers[layer].load_state_dict(own)
            for n, m in merged.model.layers[layer].named_modules():
                if isinstance(m, torch.nn.Linear):
                    shrunk = [alpha * g[n] + (1 - alpha) * torch.diag(torch.diag(g[n])) for g in grams]
                    lhs = sum(wi * s for wi, s in zip(w, shrunk))
                    rhs = sum(wi * s @ mod.model.layers[layer].get_submodule(n).weight.T for wi, s, mod in zip(w, shrunk, models))
                    m.weight.copy_(torch.linalg.solve(lhs, rhs).T)
    return {k: v.detach() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module")
def calib_files(calib_file, tmp_path_factory):
    other = tmp_path_factory.mktemp("calib2") / "code.jsonl"
    other.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["cp(xyz)=xyz", "rev(ab)=ba and so on", "7+1=8", "hello 42"]))
    return [calib_file, other]


def pp(experts, calib_files, out, *, hidden=2**30, weights=WEIGHTS, **kw):
    method = get_method("regmean_pp")({"alpha": ALPHA, "solver_dtype": "float64", **({"weights": list(weights)} if weights else {})})
    cal = Calibration(tuple(calib_files), max_length=16, batch_size=3, model_dtype="float64")
    return merge_regmean_pp(experts, method, out, calibration=cal, max_hidden_memory=hidden, **kw)


@pytest.fixture(scope="module")
def merged_pp(experts, calib_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("pp") / "m"
    return out, pp(experts, calib_files, out)


def test_regmean_pp_equals_a_direct_float64_implementation(experts, calib_files, merged_pp, tmp_path):
    out, config = merged_pp
    assert config["method"] == "regmean_pp" and config["alpha"] == ALPHA and config["weights"] == list(WEIGHTS)
    expected = direct_regmean_pp(experts, calib_files, ALPHA, WEIGHTS)
    merged = state(out)
    assert sorted(merged) == sorted(state(experts[0]))
    for name, value in merged.items():
        torch.testing.assert_close(value.double(), expected[name], rtol=1e-6, atol=1e-7, msg=name)
    # and it is not RegMean: layer 1's inputs come from the merged layer 0
    from mergeflow.grams.collect import compute_grams
    from mergeflow.params import GramParams

    grams = [tmp_path / f"g{i}" for i in range(2)]
    for e, c, g in zip(experts, calib_files, grams):
        compute_grams(e, c, g, GramParams(max_length=16, batch_size=3, dtype="float64"))
    merge_models(experts, get_method("regmean")({"alpha": ALPHA, "weights": list(WEIGHTS), "solver_dtype": "float64"}), tmp_path / "r", grams=grams)
    plain = state(tmp_path / "r")
    name = "model.layers.1.mlp.down_proj.weight"
    assert (plain[name] - merged[name]).abs().max() > 1e-3
    assert config["num_tokens"] == [json.loads((g / "grams.json").read_text())["num_tokens"] for g in grams]  # the same tokens


def test_hidden_states_streamed_to_disk_give_the_same_bytes(experts, calib_files, merged_pp, tmp_path):
    pp(experts, calib_files, tmp_path / "disk", hidden=0)
    assert (merged_pp[0] / "model.safetensors").read_bytes() == (tmp_path / "disk" / "model.safetensors").read_bytes()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # the hidden states' temporary is gone


def test_one_expert_returns_that_expert(experts, calib_files, tmp_path):
    pp(experts[:1], calib_files[:1], tmp_path / "one", weights=None)
    assert state(tmp_path / "one").keys() == state(experts[0]).keys()
    for name, value in state(tmp_path / "one").items():
        assert torch.equal(value, state(experts[0])[name]), name


def test_the_tensor_engine_refuses_it_in_one_line(experts, gram_dirs, tmp_path):
    with pytest.raises(ValueError, match=r"^method 'regmean_pp' merges layer by layer and needs the experts' calibration data: `mergeflow merge --method regmean_pp --calib FILE`"):
        merge_models(experts, get_method("regmean_pp")(), tmp_path / "m", grams=gram_dirs)
    assert not (tmp_path / "m").exists()


def test_the_command_line_merges_with_regmean_pp_and_refuses_missing_calibration(experts, calib_files, tmp_path):
    from click.testing import CliRunner

    from mergeflow.cli import main

    args = ["merge", "--method", "regmean_pp", "--model", str(experts[0]), "--model", str(experts[1]), "--out", str(tmp_path / "m")]
    missing = CliRunner().invoke(main, args)
    assert str(missing.exception) == "regmean_pp needs one calibration file per expert: 2 experts, 0 files (--calib)"
    assert not (tmp_path / "m").exists()
    done = CliRunner().invoke(main, [*args, "--calib", str(calib_files[0]), "--calib", str(calib_files[1]), "--alpha", "0.5"])
    assert done.exit_code == 0, done.output
    config = json.loads((tmp_path / "m" / "mergeflow_merge.json").read_text())
    assert config["method"] == "regmean_pp" and config["alpha"] == 0.5 and config["calibration"] == [str(c) for c in calib_files]
