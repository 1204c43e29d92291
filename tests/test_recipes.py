"""Recipes validate, `mergeflow use` switches to one, and `mergeflow plan` prices the Llama-3 one
from config files alone (a pre-filled Hugging Face cache, offline)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_sources import fill_hub_cache

from mergeflow.params import load_params
from mergeflow.plan import make_plan

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
LLAMA3_8B = {  # meta-llama/Meta-Llama-3-8B's config.json (the fields that matter)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "rope_theta": 500000.0, "max_position_embeddings": 8192,
}


def test_there_are_recipes_and_each_validates():
    assert {p.name for p in RECIPES} >= {"llama3-code-math.yaml", "llm-merging-competition.yaml"}
    llama3 = load_params(ROOT / "recipes" / "llama3-code-math.yaml")
    assert (llama3.alpha, llama3.method, llama3.gram.max_length, llama3.gram.num_samples) == (0.1, "regmean", 256, 10000)
    assert llama3.merge.regmean_lm_head and llama3.gram.include_lm_head and llama3.eval.backend == "vllm"
    competition = load_params(ROOT / "recipes" / "llm-merging-competition.yaml")
    assert competition.eval.tasks == ["cosmos_qa", "xsum"] and competition.merge.weights == [0.8, 0.2]


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.update(alpah=0.2), r"alpah: Extra inputs are not permitted"),
    (lambda r: r["gram"].update(max_length="long"), r"gram\.max_length: Input should be a valid integer"),
    (lambda r: r["models"]["hub"]["experts"].pop("math"), r"models\.hub must name the base and every expert of `experts`; missing: \['math'\]"),
    (lambda r: r.update(experts=[]), r"experts: List should have at least 1 item"),
])
def test_recipe_schema_errors_are_clear(edit, message, tmp_path):
    recipe = yaml.safe_load((ROOT / "recipes" / "llama3-code-math.yaml").read_text())
    edit(recipe)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match=message):
        load_params(bad)


def test_use_switches_params_and_refuses_a_bad_recipe(tmp_path):
    params, dvc_yaml = tmp_path / "params.yaml", tmp_path / "dvc.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    shutil.copy(ROOT / "dvc.yaml", dvc_yaml)
    run = lambda recipe: subprocess.run([sys.executable, "-m", "mergeflow", "use", recipe, "--params", params, "--dvc-yaml", dvc_yaml], capture_output=True, text=True)  # noqa: E731
    proc = run(ROOT / "recipes" / "llama3-code-math.yaml")
    assert proc.returncode == 0, proc.stderr
    assert params.read_text() == (ROOT / "recipes" / "llama3-code-math.yaml").read_text()  # comments kept
    assert "experts code, math (hub), method regmean, alpha 0.1" in proc.stdout
    merge = yaml.safe_load(dvc_yaml.read_text())["stages"]["merge"]
    assert [d for d in merge["deps"] if d.startswith("models/grams/")] == ["models/grams/code", "models/grams/math"]
    run(ROOT / "recipes" / "llm-merging-competition.yaml")
    merge = yaml.safe_load(dvc_yaml.read_text())["stages"]["merge"]
    assert [d for d in merge["deps"] if d.startswith("models/grams/")] == ["models/grams/gsm8k", "models/grams/fingpt"]
    assert "# One model and one gram directory per expert" in dvc_yaml.read_text()  # comments kept
    assert [d for d in merge["deps"] if d.startswith("models/experts")] == ["models/experts/gsm8k", "models/experts/fingpt"]
    run(ROOT / "recipes" / "llama3-code-math.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("alpha: 2\n")
    proc = run(bad)
    assert proc.returncode == 1 and "bad.yaml: invalid parameters:\n  alpha must be in [0, 1], got 2.0\n" in proc.stderr
    assert params.read_text() == (ROOT / "recipes" / "llama3-code-math.yaml").read_text()


@pytest.fixture
def llama3_configs_in_cache(tmp_path, monkeypatch):
    """Only config.json of each of the recipe's repos, in a hub cache; hub access off."""
    import huggingface_hub.constants as c

    cache = tmp_path / "hub"
    recipe = load_params(ROOT / "recipes" / "llama3-code-math.yaml")
    for repo in [recipe.models.hub.base.repo_id, *(m.repo_id for m in recipe.models.hub.experts.values())]:
        src = tmp_path / "src" / repo
        src.mkdir(parents=True)
        (src / "config.json").write_text(json.dumps(LLAMA3_8B))
        fill_hub_cache(cache, repo, src)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return recipe


def test_plan_prices_llama3_from_configs_alone(llama3_configs_in_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = make_plan(llama3_configs_in_cache, tflops=100)
    h, i, layers, vocab = 4096, 14336, 32, 128256
    # per layer: q/k/v share one [h, h] gram, o_proj one [h, h], gate/up one [h, h], down_proj [i, i]; lm_head [h, h]
    gram_bytes = (layers * (3 * h * h + i * i) + h * h) * 4
    assert plan["stages"]["gram@code"]["disk_bytes"] == gram_bytes == 32_816_234_496  # 30.6 GiB per expert
    params = vocab * h * 2 + layers * (2 * h * h + 2 * h * 1024 + 3 * h * i + 2 * h) + h
    assert plan["parameters"] == params == 8_030_261_248
    assert plan["stages"]["download"]["disk_bytes"] == 3 * params * 2  # base + 2 experts in bf16
    assert plan["stages"]["gram@math"]["max_tokens"] == 10000 * 256
    measured = json.loads((ROOT / "benchmarks" / "results" / "llama3-shapes.json").read_text())
    peak = plan["stages"]["merge"]["peak_memory_bytes"]
    regmean = next(r for r in measured["runs"] if r["run"].startswith("mergeflow regmean"))
    assert regmean["peak_anon_gib"] * 2**30 <= peak <= 3 * 2**30  # above what was measured, within the goal


def test_plan_names_the_missing_config_and_the_fix(llama3_configs_in_cache, tmp_path):
    from mergeflow.params import Params

    raw = llama3_configs_in_cache.model_dump()
    raw["models"]["hub"]["experts"]["code"] = {"repo_id": "org/absent", "revision": "main"}
    with pytest.raises(FileNotFoundError, match=r"org/absent@main: config\.json is not in the Hugging Face cache .* `hf download org/absent config\.json --revision main`"):
        make_plan(Params.model_validate(raw), tflops=100)


def test_recipes_switch_both_ways(tmp_path):
    """Toy -> SmolLM2 -> competition -> `mergeflow use recipes/toy.yaml` (the README's way back)
    gives back the committed params.yaml and dvc.yaml byte for byte, each step printing its changes."""
    from mergeflow.recipes import use_recipe

    params, dvc_yaml = tmp_path / "params.yaml", tmp_path / "dvc.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    shutil.copy(ROOT / "dvc.yaml", dvc_yaml)
    assert (ROOT / "recipes" / "toy.yaml").read_bytes() == params.read_bytes()
    _, changes = use_recipe(ROOT / "recipes" / "smollm2-cpu.yaml", params, dvc_yaml)
    assert f"{params}: experts: ['math', 'code'] -> ['math', 'list']" in changes
    assert f"{dvc_yaml}: stage merge: deps +models/experts/list +models/grams/list -models/experts/code -models/grams/code" in changes
    _, changes = use_recipe(ROOT / "recipes" / "llm-merging-competition.yaml", params, dvc_yaml)
    assert f"{dvc_yaml}: stage download-eval: deps +data-src/test.csv -models/base, params +2 -3" in changes
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    assert stages["download"]["foreach"] == {"gsm8k": {"calib": "data-src/validation/cosmos_qa.csv"}, "fingpt": {"calib": "data-src/validation/xsum.csv"}}
    _, changes = use_recipe(ROOT / "recipes" / "toy.yaml", params, dvc_yaml)
    assert params.read_bytes() == (ROOT / "params.yaml").read_bytes() and dvc_yaml.read_bytes() == (ROOT / "dvc.yaml").read_bytes()
    assert use_recipe(ROOT / "recipes" / "toy.yaml", params, dvc_yaml)[1] == []  # nothing left to change
