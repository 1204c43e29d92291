"""`mergeflow merge --config`: mergekit 0.1.5 configs give the same tensors as the equivalent
flags, and what mergeflow cannot run exactly is refused in one line naming the key, nothing written.

The configs are the shapes of mergekit's own examples (examples/linear.yml, ties.yml,
gradient-slerp.yml), on tiny local models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers import make_tiny_llama, run_cli, state

from mergeflow.mergekit_config import MERGEKIT_METHODS, ConfigError, translate


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """A base and two experts of one architecture and tokenizer."""
    root = tmp_path_factory.mktemp("zoo")
    return {name: make_tiny_llama(root / name, seed=seed) for name, seed in (("base", 10), ("a", 11), ("b", 12))}


def write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def same_tensors(a: Path, b: Path) -> None:
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def merged_by_flags(zoo, tmp_path, capsys, args: list[str]) -> Path:
    out = tmp_path / "flags"
    code, err = run_cli(["merge", "--model", str(zoo["a"]), "--model", str(zoo["b"]), "--out", str(out), *args], capsys)
    assert code == 0, err
    return out


def merged_by_config(zoo, tmp_path, capsys, config: dict) -> Path:
    out = tmp_path / "config"
    code, err = run_cli(["merge", "--config", str(write(tmp_path, config)), str(out)], capsys)
    assert code == 0, err
    return out


def test_linear_is_average_with_weights(zoo, tmp_path, capsys):
    config = {"models": [{"model": str(zoo["a"]), "parameters": {"weight": 1.0}}, {"model": str(zoo["b"]), "parameters": {"weight": 0.3}}],
              "merge_method": "linear", "dtype": "float32"}
    flags = merged_by_flags(zoo, tmp_path, capsys, ["--method", "average", "--weight", "1.0", "--weight", "0.3"])
    same_tensors(merged_by_config(zoo, tmp_path, capsys, config), flags)


def test_task_arithmetic_lambda_is_scaling(zoo, tmp_path, capsys):
    config = {"models": [{"model": str(zoo["a"]), "parameters": {"weight": 0.7}}, {"model": str(zoo["b"]), "parameters": {"weight": 0.4}}],
              "merge_method": "task_arithmetic", "base_model": str(zoo["base"]), "parameters": {"lambda": 0.5, "int8_mask": True},
              "tokenizer_source": "base"}
    flags = merged_by_flags(zoo, tmp_path, capsys, ["--method", "task_arithmetic", "--base", str(zoo["base"]), "--weight", "0.7", "--weight", "0.4",
                                                    "--scaling", "0.5"])
    same_tensors(merged_by_config(zoo, tmp_path, capsys, config), flags)


def test_task_arithmetic_normalize_divides_the_weights(zoo, tmp_path, capsys):
    config = {"models": [{"model": str(zoo["a"]), "parameters": {"weight": 3.0}}, {"model": str(zoo["b"]), "parameters": {"weight": 1.0}}],
              "merge_method": "task_arithmetic", "base_model": str(zoo["base"]), "parameters": {"normalize": True}}
    flags = merged_by_flags(zoo, tmp_path, capsys, ["--method", "task_arithmetic", "--base", str(zoo["base"]), "--weight", "0.75", "--weight", "0.25"])
    same_tensors(merged_by_config(zoo, tmp_path, capsys, config), flags)


def test_ties_takes_mergekits_defaults(zoo, tmp_path, capsys):
    """Top-level `density`, per-model weights; lambda missing: mergekit's 1.0 (ours too)."""
    config = {"models": [{"model": str(zoo["base"])}, {"model": str(zoo["a"]), "parameters": {"weight": 1.0}},
                         {"model": str(zoo["b"]), "parameters": {"weight": 1.0}}],
              "merge_method": "ties", "base_model": str(zoo["base"]), "parameters": {"density": 0.5, "normalize": True}, "dtype": "float32"}
    flags = merged_by_flags(zoo, tmp_path, capsys, ["--method", "ties", "--base", str(zoo["base"]), "--density", "0.5"])
    same_tensors(merged_by_config(zoo, tmp_path, capsys, config), flags)


def test_one_full_slice_is_the_same_as_models(zoo, tmp_path, capsys):
    config = {"slices": [{"sources": [{"model": str(zoo["a"]), "layer_range": [0, 2], "parameters": {"weight": 0.5}},
                                      {"model": str(zoo["b"]), "layer_range": [0, 2], "parameters": {"weight": 0.5}}]}],
              "merge_method": "linear"}
    flags = merged_by_flags(zoo, tmp_path, capsys, ["--method", "average"])
    same_tensors(merged_by_config(zoo, tmp_path, capsys, config), flags)


def test_mergekit_defaults_replace_ours():
    """TIES without density: mergekit keeps everything (1.0), mergeflow's own default is 0.2."""
    t = translate({"models": [{"model": "a", "parameters": {"weight": 1}}, {"model": "b", "parameters": {"weight": 1}}],
                   "merge_method": "ties", "base_model": "base"})
    assert (t.method, t.experts, t.base, t.values["density"], t.values["scaling"]) == ("ties", ["a", "b"], "base", 1.0, 1.0)


@pytest.mark.parametrize("method,expected", [
    ("dare_ties", {"normalize": False, "rescale": True, "density": 1.0, "scaling": 1.0}),
    ("della", {"normalize": True, "rescale": True, "density": 1.0, "epsilon": 0.15}),
    ("breadcrumbs_ties", {"normalize": False, "rescale": False, "density": 1.0, "gamma": 0.01}),
    ("ties", {"convention": "mergekit", "density": 1.0}),
])
def test_mergekit_method_defaults_are_set_explicitly(method, expected):
    """mergekit's own defaults of each method, not ours; `seed` (ours only) passes through."""
    t = translate({"models": [{"model": "a", "parameters": {"weight": 1}}, {"model": "b", "parameters": {"weight": 0.5}}],
                   "merge_method": method, "base_model": "base", **({"parameters": {"seed": 3}} if method.startswith("d") else {})})
    assert {k: t.values[k] for k in expected} == expected
    assert t.values["weights"] == [1, 0.5]
    assert t.values.get("seed") == (3 if method.startswith("d") else None)


def test_gradients_and_filters_become_per_layer_values():
    t = translate({"models": [{"model": "m0"}, {"model": "m1"}], "merge_method": "slerp", "base_model": "m0",
                   "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"filter": "mlp", "value": [1, 0.5, 0]}, {"value": 0.5},
                                        {"filter": "lm_head", "value": 0.9}]}})
    assert (t.method, t.experts, t.base) == ("slerp", ["m0", "m1"], None)
    # mergekit stops at the first matching entry: nothing after the catch-all is reached
    assert t.values["t"] == {"self_attn": [0, 0.5, 1], "mlp": [1, 0.5, 0], "*": 0.5}


BAD = [
    ({"modules": {}}, "modules: unsupported key (per-module sub-merges); remove it"),
    ({"out_dtype": "bfloat16"}, "out_dtype: unsupported key"),
    ({"merge_method": "passthrough"}, "merge_method: 'passthrough' is not a mergekit method mergeflow shares"),
    ({"parameters": {"lamda": 0.5}}, "parameters.lamda: not a parameter of mergekit's task_arithmetic"),
    ({"merge_method": "ties", "parameters": {"rescale": True}},
     "parameters.rescale: True is not supported by mergeflow's ties (mergekit's ties); it always behaves as rescale: False"),
    ({"models": [{"model": "a", "parameters": {"weight": 1, "lambda": 2}}, {"model": "b", "parameters": {"weight": 1}}]},
     "models[0].parameters.lambda: a parameter of the whole merge: move it to the top-level `parameters`"),
    ({"models": [{"model": "a", "parameters": {"weight": 1}}, {"model": "b"}]}, "models[1].parameters.weight: required by mergekit"),
    ({"models": [{"model": "a+lora", "parameters": {"weight": 1}}]}, "models[0].model: 'a+lora': only a model directory"),
    ({"base_model": None}, "base_model: mergekit's task_arithmetic needs the base model"),
    ({"tokenizer_source": "union"}, "tokenizer_source: 'union' is not supported"),
    ({"dtype": "int8"}, "dtype: 'int8' is not one of"),
    ({"models": [{"model": "a", "parameters": {"weight": [{"pattern": "mlp", "value": 1}]}}, {"model": "b", "parameters": {"weight": 1}}]},
     "models[0].parameters.weight[0].pattern: unsupported key"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_configs_are_refused_naming_the_key(change, message):
    config = {"models": [{"model": "a", "parameters": {"weight": 1}}, {"model": "b", "parameters": {"weight": 1}}],
              "merge_method": "task_arithmetic", "base_model": "base", **change}
    with pytest.raises(ConfigError) as err:
        translate({k: v for k, v in config.items() if v is not None})
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_refusals_name_the_file_and_write_nothing(zoo, tmp_path, capsys):
    config = write(tmp_path, {"models": [{"model": str(zoo["a"])}, {"model": str(zoo["b"])}, {"model": str(zoo["base"])}],
                              "merge_method": "slerp", "base_model": str(zoo["a"]), "parameters": {"t": 0.5}})
    code, err = run_cli(["merge", "--config", str(config), str(tmp_path / "out")], capsys)
    assert code == 1
    assert err.strip() == f"mergeflow: error: {config}: models: slerp merges exactly two models, the base_model and one other; got 2 besides the base"
    assert not (tmp_path / "out").exists()


def test_dtype_and_model_directories_are_checked(zoo, tmp_path, capsys):
    base = {"models": [{"model": str(zoo["a"]), "parameters": {"weight": 1.0}}, {"model": str(zoo["b"]), "parameters": {"weight": 1.0}}],
            "merge_method": "linear"}
    for change, message in ((({"dtype": "bfloat16"}), f"dtype: bfloat16 but {zoo['a']} stores float32"),
                            ({"models": [{"model": "org/repo", "parameters": {"weight": 1.0}}]}, "models[0].model: 'org/repo' is not a local model directory")):
        code, err = run_cli(["merge", "--config", str(write(tmp_path, {**base, **change})), str(tmp_path / "out")], capsys)
        assert code == 1 and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists()


def test_table_matches_mergekit_itself():
    """Our table of mergekit's parameters (defaults, per-model or shared) is mergekit 0.1.5's."""
    registry = pytest.importorskip("mergekit.merge_methods.registry")
    from mergeflow.mergekit_config import REQUIRED

    for method in registry.registered_methods():
        spec = method.spec
        if spec.name not in MERGEKIT_METHODS:
            continue
        theirs = {p.name: (REQUIRED if p.required else p.default, "shared" if p.scope.name == "SHARED" else "model") for p in spec.parameters}
        assert theirs == MERGEKIT_METHODS[spec.name].params, spec.name
        base = {"REQUIRED": "required", "OPTIONAL": "optional", "IGNORED": "ignored"}[spec.contract.base.name]
        assert base == MERGEKIT_METHODS[spec.name].base, spec.name


def test_a_recipe_block_merges_in_the_stage(zoo, tmp_path, capsys):
    """`method: mergekit` with a `merge.mergekit` block naming the experts and `base`: the merge
    stage gives the same tensors as the flags."""
    import argparse
    import importlib.util

    from mergeflow.params import Params

    experts = tmp_path / "experts"
    experts.mkdir()
    for name, src in (("math", zoo["a"]), ("list", zoo["b"])):
        (experts / name).symlink_to(src)
    block = {"models": [{"model": "list", "parameters": {"weight": 0.4}}, {"model": "math", "parameters": {"weight": 0.7}}],
             "merge_method": "task_arithmetic", "base_model": "base", "parameters": {"lambda": 0.5}, "dtype": "float32"}
    params = Params.model_validate({"method": "mergekit", "experts": ["math", "list"], "merge": {"mergekit": block}})
    spec = importlib.util.spec_from_file_location("merge_stage", Path(__file__).parents[1] / "stages" / "merge.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    out = tmp_path / "merged"
    stage.main(argparse.Namespace(experts=experts, grams=tmp_path / "grams", base=zoo["base"], out=out, dvc_yaml=tmp_path / "dvc.yaml"), params)
    code, err = run_cli(["merge", "--method", "task_arithmetic", "--base", str(zoo["base"]), "--model", str(zoo["b"]), "--model", str(zoo["a"]),
                         "--weight", "0.4", "--weight", "0.7", "--scaling", "0.5", "--out", str(tmp_path / "flags")], capsys)
    assert code == 0, err
    same_tensors(out, tmp_path / "flags")


def test_a_recipe_block_must_name_the_experts():
    from pydantic import ValidationError

    from mergeflow.params import Params

    block = {"models": [{"model": "math", "parameters": {"weight": 1}}, {"model": "code", "parameters": {"weight": 1}}], "merge_method": "linear"}
    with pytest.raises(ValidationError, match=r"merge\.mergekit: merges \['math', 'code'\] \(base_model None\) but `experts` lists \['math', 'list'\]"):
        Params.model_validate({"method": "mergekit", "experts": ["math", "list"], "merge": {"mergekit": block}})
    with pytest.raises(ValidationError, match=r"merge\.mergekit\.parameters\.lamda: not a parameter of mergekit's linear"):
        Params.model_validate({"method": "mergekit", "experts": ["math", "code"], "merge": {"mergekit": {**block, "parameters": {"lamda": 1}}}})
    with pytest.raises(ValidationError, match=r"method: mergekit needs a mergekit config under merge\.mergekit"):
        Params.model_validate({"method": "mergekit", "experts": ["math", "code"]})


def test_gradients_and_filters_equal_per_layer_flags(zoo, tmp_path, capsys):
    """mergekit's ties.yml style: a weight gradient per model and a filtered lambda (with a
    gradient inside), against the same per-layer values given as flags."""
    config = {"models": [{"model": str(zoo["a"]), "parameters": {"weight": [0.0, 0.3, 1.0]}},
                         {"model": str(zoo["b"]), "parameters": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 0.2}]}}],
              "merge_method": "task_arithmetic", "base_model": str(zoo["base"]),
              "parameters": {"lambda": [{"filter": "self_attn", "value": [1.0, 0.5]}, {"value": 0.8}]}}
    flags = merged_by_flags(zoo, tmp_path, capsys, ["--method", "task_arithmetic", "--base", str(zoo["base"]), "--weight", "[0.0, 0.3, 1.0]",
                                                    "--weight", "{mlp: 0.5, '*': 0.2}", "--scaling", "{self_attn: [1.0, 0.5], '*': 0.8}"])
    by_config = merged_by_config(zoo, tmp_path, capsys, config)
    same_tensors(by_config, flags)
    sa, sb = state(by_config), state(merged_by_flags(zoo, tmp_path / "plain", capsys, ["--method", "task_arithmetic", "--base", str(zoo["base"])]))
    assert not torch.equal(sa["model.layers.1.mlp.up_proj.weight"], sb["model.layers.1.mlp.up_proj.weight"])  # the values did apply


def run_mergekit(config: dict, out: Path) -> Path:
    """mergekit 0.1.5 itself on `config` (skipped where it is not installed)."""
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(config), str(out), MergeOptions(copy_tokenizer=False))
    return out


MERGEKIT_CASES = {
    "linear": lambda z: {"models": [{"model": z["a"], "parameters": {"weight": 1.0}}, {"model": z["b"], "parameters": {"weight": 0.3}}],
                         "merge_method": "linear", "dtype": "float32"},
    "task_arithmetic gradients and filters": lambda z: {
        "models": [{"model": z["a"], "parameters": {"weight": [0.0, 0.3, 1.0]}},
                   {"model": z["b"], "parameters": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 0.2}]}}],
        "merge_method": "task_arithmetic", "base_model": z["base"],
        "parameters": {"lambda": [{"filter": "self_attn", "value": [1.0, 0.5]}, {"value": 0.8}]}, "dtype": "float32"},
    "task_arithmetic normalize": lambda z: {
        "models": [{"model": z["a"], "parameters": {"weight": 3.0}}, {"model": z["b"], "parameters": {"weight": 1.0}}],
        "merge_method": "task_arithmetic", "base_model": z["base"], "parameters": {"normalize": True, "lambda": 0.7}},
    "ties unequal weights": lambda z: {
        "models": [{"model": z["a"], "parameters": {"weight": 1.0, "density": 0.5}}, {"model": z["b"], "parameters": {"weight": 0.5, "density": 0.5}}],
        "merge_method": "ties", "base_model": z["base"], "parameters": {"int8_mask": True}},
    "slerp (examples/gradient-slerp.yml)": lambda z: {
        "slices": [{"sources": [{"model": z["a"], "layer_range": [0, 2]}, {"model": z["b"], "layer_range": [0, 2]}]}],
        "merge_method": "slerp", "base_model": z["a"],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}},
    "nuslerp with a base": lambda z: {
        "models": [{"model": z["a"], "parameters": {"weight": 0.7}}, {"model": z["b"], "parameters": {"weight": 0.3}}],
        "merge_method": "nuslerp", "base_model": z["base"]},
    "breadcrumbs": lambda z: {
        "models": [{"model": z["a"], "parameters": {"weight": 1.0}}, {"model": z["b"], "parameters": {"weight": 0.5}}],
        "merge_method": "breadcrumbs", "base_model": z["base"], "parameters": {"density": 0.9, "gamma": 0.05}},
    "dare_linear, no drop": lambda z: {
        "models": [{"model": z["a"], "parameters": {"weight": 1.0}}, {"model": z["b"], "parameters": {"weight": 0.5}}],
        "merge_method": "dare_linear", "base_model": z["base"], "parameters": {"lambda": 0.8}},
    "model_stock": lambda z: {"models": [{"model": z["a"]}, {"model": z["b"]}], "merge_method": "model_stock", "base_model": z["base"]},
    "sce": lambda z: {"models": [{"model": z["a"]}, {"model": z["b"]}], "merge_method": "sce", "base_model": z["base"], "parameters": {"select_topk": 0.5}},
    "karcher": lambda z: {"models": [{"model": z["a"]}, {"model": z["b"]}], "merge_method": "karcher"},
}


@pytest.mark.parametrize("case", MERGEKIT_CASES)
def test_config_gives_mergekits_tensors(zoo, tmp_path, capsys, case):
    """The same config through mergekit 0.1.5 and through `mergeflow merge --config`: equal to
    float rounding (mergekit computes some sums in another order)."""
    from mergeflow.methods import available

    config = MERGEKIT_CASES[case]({k: str(v) for k, v in zoo.items()})
    if MERGEKIT_METHODS[config["merge_method"]].ours not in available():
        pytest.skip(f"no {config['merge_method']} method in this version")
    theirs, ours = state(run_mergekit(config, tmp_path / "mergekit")), state(merged_by_config(zoo, tmp_path, capsys, config))
    assert theirs.keys() == ours.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6, msg=name)


def test_config_excludes_method_flags(zoo, tmp_path, capsys):
    config = write(tmp_path, MERGEKIT_CASES["linear"]({k: str(v) for k, v in zoo.items()}))
    for extra, message in ((["--scaling", "0.3"], "--config sets the method's params itself: drop --scaling"),
                           (["--method", "average"], "--config names the method and models itself: drop --method and --model")):
        code, err = run_cli(["merge", "--config", str(config), str(tmp_path / "out"), *extra], capsys)
        assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()
