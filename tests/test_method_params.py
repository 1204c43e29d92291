"""Declared method parameters: per-layer values (gradients, mappings) with exact values, what the
merge config records, and the command line and params.yaml that come from the declarations."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from helpers import make_tiny_llama, run_cli, state
from mergeflow.grams import GramDir
from mergeflow.merge import MERGE_CONFIG, merge_models
from mergeflow.methods import get_method
from mergeflow.params import load_params

LAYER_NAMES = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)] + ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]


@pytest.fixture(scope="module")
def three_layers(tmp_path_factory):
    """Two experts and their base, tiny Llamas of 3 blocks."""
    root = tmp_path_factory.mktemp("three")
    return [make_tiny_llama(root / name, seed=seed, layers=3) for name, seed in (("a", 10), ("b", 11), ("base", 12))]


def test_a_gradient_is_mergekits_interpolation_over_the_blocks():
    m = get_method("task_arithmetic")({"scaling": [0.0, 1.0, 0.0]})
    m.prepare(LAYER_NAMES)
    # block i of 3 at t = i / 2; everything outside the blocks at t = 0 (as mergekit 0.1.5)
    assert [m.value("scaling", n) for n in LAYER_NAMES] == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    m = get_method("task_arithmetic")({"scaling": [0.2, 0.6]})
    m.prepare(LAYER_NAMES[:2])  # 2 blocks: t = 0 and 1
    assert [m.value("scaling", n) for n in LAYER_NAMES[:2]] == [0.2, 0.6]
    m = get_method("task_arithmetic")({"scaling": [0.2, 0.6]})
    m.prepare(LAYER_NAMES[:1])  # 1 block: t = 1, as mergekit
    assert m.value("scaling", LAYER_NAMES[0]) == 0.6


def test_a_mapping_takes_the_first_pattern_in_the_name():
    m = get_method("regmean")({"alpha": {"self_attn": 0.3, "mlp": [0.0, 1.0], "layers.0": 0.9}})
    m.prepare(LAYER_NAMES)
    assert m.value("alpha", "model.layers.0.self_attn.q_proj.weight") == 0.3  # self_attn before layers.0
    assert m.value("alpha", "model.layers.0.input_layernorm.weight") == 0.9
    assert [m.value("alpha", f"model.layers.{i}.mlp.down_proj.weight") for i in range(3)] == [0.0, 0.5, 1.0]  # a gradient inside
    assert m.value("alpha", "model.layers.2.input_layernorm.weight") == 0.1  # no match: the declared default
    assert get_method("regmean")({"alpha": {"mlp": 0.7, "*": 0.2}}).value("alpha", "lm_head.weight") == 0.2


def test_a_scaling_gradient_over_three_blocks_gives_the_closed_form(three_layers, tmp_path):
    """task_arithmetic with scaling [0, 1]: block i gets base + (i / 2) (tau_a + tau_b), the rest base."""
    a, b, base = three_layers
    config = merge_models([a, b], get_method("task_arithmetic")({"scaling": [0.0, 1.0]}), tmp_path / "out", base=base)
    merged, sa, sb, s0 = state(tmp_path / "out"), state(a), state(b), state(base)
    for name, tensor in merged.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else 0
        expected = s0[name].double() + (layer / 2) * ((sa[name].double() - s0[name]) + (sb[name].double() - s0[name]))
        torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert torch.equal(merged["lm_head.weight"], s0["lm_head.weight"])  # t = 0: scaling 0
    assert config["scaling"] == [0.0, 1.0] and json.loads((tmp_path / "out" / MERGE_CONFIG).read_text())["scaling"] == [0.0, 1.0]


def test_per_module_mapping_gives_each_module_its_value(three_layers, tmp_path):
    a, b, base = three_layers
    merge_models([a, b], get_method("task_arithmetic")({"scaling": {"self_attn": 0.5, "mlp": 2.0}}), tmp_path / "out", base=base)
    merged, sa, sb, s0 = state(tmp_path / "out"), state(a), state(b), state(base)
    for name, tensor in merged.items():
        scaling = 0.5 if "self_attn" in name else 2.0 if "mlp" in name else 1.0
        expected = s0[name].double() + scaling * ((sa[name].double() - s0[name]) + (sb[name].double() - s0[name]))
        torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_per_expert_weight_gradients_equal_mergekit_linear(three_layers, tmp_path):
    """mergekit's per-model `weight: [1, 0]` / `[0, 1]` gradients (linear, normalised) are our
    per-expert weight gradients, to the bit: block i mixes (1 - i/2, i/2); embeddings, final norm
    and lm_head take t = 0 (the first expert) in mergekit 0.1.5."""
    pytest.importorskip("mergekit", reason="mergekit 0.1.5 is the reference for gradients")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    a, b, _ = three_layers
    config = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(a), "parameters": {"weight": [1.0, 0.0]}}, {"model": str(b), "parameters": {"weight": [0.0, 1.0]}}]}
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "mk"), options=MergeOptions(allow_crimes=True, copy_tokenizer=False))
    merge_models([a, b], get_method("average")({"weights": [[1.0, 0.0], [0.0, 1.0]]}), tmp_path / "ours")
    theirs, ours, sa, sb = state(tmp_path / "mk"), state(tmp_path / "ours"), state(a), state(b)
    assert theirs.keys() == ours.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert torch.equal(ours["lm_head.weight"], sa["lm_head.weight"]) and torch.equal(ours["model.layers.2.mlp.up_proj.weight"], sb["model.layers.2.mlp.up_proj.weight"])


def test_regmean_alpha_per_layer_is_each_layers_closed_form(experts, gram_dirs, tmp_path):
    """alpha [0, 1] over 2 blocks: block 0 is the diagonal-weighted average (alpha 0), block 1 full
    RegMean (alpha 1); a factorisation is never reused across two alphas."""
    merge_models(experts, get_method("regmean")({"alpha": [0.0, 1.0], "solver_dtype": "float64"}), tmp_path / "rm", grams=gram_dirs)
    merged, states = state(tmp_path / "rm"), [state(e) for e in experts]
    gdirs = [GramDir.open(g) for g in gram_dirs]
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        alpha = float(module.split(".")[2])
        grams = [alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g)) for g in (d.load(module).double() / d.num_tokens for d in gdirs)]
        weights = [s[f"{module}.weight"].double() for s in states]
        expected = torch.linalg.solve(sum(grams), sum(g @ w.T for g, w in zip(grams, weights))).T
        torch.testing.assert_close(merged[f"{module}.weight"].double(), expected, rtol=1e-5, atol=1e-5)


def test_the_merge_config_lists_every_declared_param(experts, tmp_path):
    base = experts[1]
    config = merge_models(experts, get_method("ties")({"density": 0.5}), tmp_path / "out", base=base)
    assert {k: config[k] for k in ("method", "weights", "scaling", "density")} == {"method": "ties", "weights": None, "scaling": 1.0, "density": 0.5}
    assert "solved_modules" not in config  # RegMean's report, not every method's
    assert '"density": 0.5' in (tmp_path / "out" / "README.md").read_text()


def test_methods_command_lists_and_describes():
    from click.testing import CliRunner

    from mergeflow.cli import main

    listing = CliRunner().invoke(main, ["methods"])
    assert listing.exit_code == 0
    assert [line.split()[0] for line in listing.output.splitlines()] == ["average", "regmean", "task_arithmetic", "ties"]
    assert listing.output.splitlines()[1].endswith("[params: alpha, weights, solver_dtype]")
    described = CliRunner().invoke(main, ["methods", "--describe", "ties"])
    assert described.exit_code == 0
    assert described.output.splitlines() == [
        "ties: TIES-Merging: Resolving Interference When Merging Models (Yadav et al., NeurIPS 2023).",
        "paper: https://arxiv.org/abs/2306.01708",
        "needs: the base model (--base)",
        "params:",
        "  weights: list of float (or per layer: list / {pattern: value}), one per expert, default None, >= 0",
        "      one weight per expert, in the experts' order; null: equal",
        "  scaling: float (or per layer: list / {pattern: value}), default 1.0",
        "      lambda: the factor on the merged task vector",
        "  density: float (or per layer: list / {pattern: value}), default 0.2, (0, 1]",
        "      fraction of each task vector kept (largest magnitudes)",
    ]


PLUGIN = textwrap.dedent(
    '''
    import torch
    from mergeflow.methods.base import MergeMethod, Param

    class Power(MergeMethod):
        """The mean of |w|^p, signed by the mean: a plugin with a knob of its own."""
        name = "power"
        params = (Param("power", float, 1.0, "the exponent", low=0.0, low_open=True),)

        def merge(self, name, tensors, *, grams=None, base=None):
            p = self.value("power", name)
            mean = torch.stack([t.float() for t in tensors]).mean(0)
            return mean.sign() * torch.stack([t.float().abs() ** p for t in tensors]).mean(0) ** (1 / p)
    '''
)


def test_a_plugin_declares_its_own_knob(experts, tmp_path, capsys):
    plugin = tmp_path / "power.py"
    plugin.write_text(PLUGIN)
    out = tmp_path / "out"
    code, err = run_cli(["merge", "--method", f"{plugin}:Power", "--param", "power=0", "--model", str(experts[0]), "--model", str(experts[1]), "--out", str(out)], capsys)
    assert (code, err.strip()) == (1, "mergeflow: error: power: power must be > 0, got 0.0 (--param power=...)") and not out.exists()
    code, err = run_cli(["merge", "--method", f"{plugin}:Power", "--param", "power=1", "--model", str(experts[0]), "--model", str(experts[1]), "--out", str(out)], capsys)
    assert code == 0, err
    assert json.loads((out / MERGE_CONFIG).read_text())["power"] == 1.0
    merged, a, b = state(out), state(experts[0]), state(experts[1])
    torch.testing.assert_close(merged["model.norm.weight"], ((a["model.norm.weight"] + b["model.norm.weight"]) / 2).sign() * (a["model.norm.weight"].abs() + b["model.norm.weight"].abs()) / 2)
    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    params["method"], params["merge"]["power"] = f"{plugin}:Power", 2.0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert load_params(tmp_path / "params.yaml").merge.method_values()["power"] == 2.0
    params["method"] = "regmean"  # no method declares `power` then
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ValueError, match=r"merge\.power: unknown key; the merge methods read alpha \(top level\), density, "):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "regmean", "--density", "0.3"], "regmean: unknown parameter 'density'; regmean reads alpha, weights, solver_dtype (--density)"),
        (["--method", "average", "--weight", "1", "--weight", "2", "--weight", "3"], "average: weights has 3 values for 2 experts; give one per expert, in their order"),
        (["--method", "regmean", "--alpha", "[0.1, 1.5]"], "regmean: alpha[1] must be in [0, 1], got 1.5 (--alpha)"),
        (["--method", "average", "--param", "weights"], "--param 'weights': expected NAME=VALUE"),
        (["--method", "average", "--param", "weights=[1, 2"], "--param 'weights=[1, 2': '[1, 2' is not a value, list or mapping (YAML)"),
    ],
)
def test_merge_option_errors_are_one_line_and_write_nothing(experts, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    code, err = run_cli(["merge", *args, "--model", str(experts[0]), "--model", str(experts[1]), "--out", str(out)], capsys)
    assert code == 1 and err.strip().removeprefix("mergeflow: error: ") == message
    assert not out.exists()
