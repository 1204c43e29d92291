"""The LLM-Merging competition recipe, end to end, on toy-sized stand-ins laid out like the real
models: a base Llama and two LoRA adapters (ranks 16 and 8) in a Hugging Face cache under the
recipe's repo ids, offline; CosmosQA + XSum validation CSVs and a test.csv in the competition's
format. Only what cannot run on 2 CPU cores is overridden (device, dtype, HF backend, a limit)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import copy_repo, make_tiny_llama, ran, run
from test_adapters import make_lora
from test_sources import fill_hub_cache

pytestmark = pytest.mark.slow
CPU = {"gram": {"device": "cpu", "model_dtype": "float32", "num_samples": 8, "max_length": 32},
       "merge": {"device": "cpu"}, "eval": {"backend": "hf", "limit": 3, "max_gen_toks": 8, "hf": {"dtype": "float32", "batch_size": 8, "device": "cpu"}},
       "submit": {"max_new_tokens": 8}}


def competition_csvs(folder: Path) -> None:
    (folder / "validation").mkdir(parents=True)
    story = "Anna went to the shop because she needed milk. She paid and walked home."
    pd.DataFrame({
        "id": range(4), "input": [f"{story} Question: why did Anna go out? Answer:"] * 4, "target": ["0", "1", "2", "0"],
        "answer_choices": ["['to buy milk', 'to sleep', 'to swim', 'to sing']"] * 4, "eval_type": ["multiple_choice"] * 4,
    }).to_csv(folder / "validation" / "cosmos_qa.csv", index=False)
    pd.DataFrame({
        "id": range(4), "input": [f"Article: {story} A summary is"] * 4, "target": ["Anna bought milk."] * 4,
        "answer_choices": ["None"] * 4, "eval_type": ["generation"] * 4,
    }).to_csv(folder / "validation" / "xsum.csv", index=False)
    pd.DataFrame({
        "id": range(5), "input": ["2+2=", "Pick the colour of the sky:", "Say hi.", "Is 3 > 2?", "Summarise: cats sleep a lot."],
        "eval_type": ["generation", "multiple_choice", "generation", "multiple_choice", "generation"],
        "answer_choices": ["", "['blue', 'green', 'red', 'black']", "", "['Yes', 'No']", ""],
    }).to_csv(folder / "test.csv", index=False)


def deep_update(target: dict, changes: dict) -> dict:
    for key, value in changes.items():
        target[key] = deep_update(target.get(key) or {}, value) if isinstance(value, dict) else value
    return target


def test_competition_recipe_end_to_end_on_toy_stand_ins(tmp_path_factory):
    root = tmp_path_factory.mktemp("competition")
    repo = root / "repo"
    env = copy_repo(repo, root / "site-cache")
    recipe = yaml.safe_load((repo / "recipes" / "llm-merging-competition.yaml").read_text())
    hub = recipe["models"]["hub"]
    cache, src = root / "hub", root / "src"
    base = make_tiny_llama(src / "base", seed=3)
    fill_hub_cache(cache, hub["base"]["repo_id"], base)
    for (name, expert), (rank, seed) in zip(hub["experts"].items(), [(16, 1), (8, 2)]):
        fill_hub_cache(cache, expert["repo_id"], make_lora(base, src / name, rank, 2 * rank, seed))
    competition_csvs(repo / "data-src")
    env = {**env, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf-home")}

    out = run(["mergeflow", "use", "recipes/llm-merging-competition.yaml"], repo, env)
    assert "experts gsm8k, fingpt (hub), method average" in out
    assert "params.yaml: models.hub.experts.gsm8k.revision: main -> " in out  # pinned from the cache's refs/main
    assert "dvc.yaml: stage download-eval: deps +data-src/test.csv" in out
    params = deep_update(yaml.safe_load((repo / "params.yaml").read_text()), CPU)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro", "evaluate", "submit"], repo, env)  # the reference evaluations of base and experts are left out
    assert ran(out) == {"download-base", "download@gsm8k", "download@fingpt", "download-eval", "gram@gsm8k", "gram@fingpt", "fisher@gsm8k", "fisher@fingpt", "merge", "evaluate", "submit"}

    merge_config = json.loads((repo / "models" / "merged" / "mergeflow_merge.json").read_text())
    assert merge_config["method"] == "average" and merge_config["weights"] == [0.8, 0.2]
    metrics = json.loads((repo / "metrics" / "merged.json").read_text())
    assert 0 <= metrics["cosmos_qa"]["acc"] <= 1
    assert {"rouge1", "rouge2", "rougeL", "rougeLsum"} <= set(metrics["xsum"])
    submission = pd.read_csv(repo / "submission.csv", keep_default_na=False)
    assert list(submission.columns) == ["id", "prediction", "dummy_field"] and submission["id"].tolist() == list(range(5))
    assert submission.loc[[1, 3], "prediction"].astype(int).between(0, 3).all()
    params["merge"]["weights"] = [0.5, 0.5]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(run(["dvc", "status", "--json", "--with-deps", "submit"], repo, env))  # where `dvc repro submit` would start
    assert status == {"merge": [{"changed deps": {"params.yaml": {"merge": "modified"}}}]}  # grams are kept
