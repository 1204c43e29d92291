"""The Flan-T5 recipe (the LLM-Merging kit's FlanT5Avg setting, with RegMean), end to end, on toy
stand-ins laid out like the real models: a tiny T5 base (Flan-T5's layout, byte-level BPE) and two
LoRA adapters on q/v in a Hugging Face cache under the recipe's repo ids and commits, offline; the
competition's CSVs. Only what cannot run on 2 CPU cores is overridden (device, dtype, a limit)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import yaml
from helpers import copy_repo, ran, run, state
from seq2seq_helpers import make_t5_lora, make_tiny_t5
from test_competition_recipe import competition_csvs, deep_update
from test_sources import fill_hub_cache

pytestmark = pytest.mark.slow
CPU = {"gram": {"device": "cpu", "model_dtype": "float32", "num_samples": 8, "max_length": 32, "dtype": "float64"},
       "merge": {"device": "cpu", "solver_dtype": "float64"},
       "eval": {"backend": "auto", "limit": 2, "max_gen_toks": 4, "hf": {"dtype": "float32", "batch_size": 8, "device": "cpu"}},
       "submit": {"max_new_tokens": 4}}
MAIN = "0123456789abcdef0123456789abcdef01234567"


def test_flan_t5_recipe_end_to_end_on_toy_stand_ins(tmp_path_factory):
    root = tmp_path_factory.mktemp("flan-t5")
    repo = root / "repo"
    env = copy_repo(repo, root / "site-cache")
    recipe = yaml.safe_load((repo / "recipes" / "flan-t5-competition.yaml").read_text())
    hub = recipe["models"]["hub"]
    cache, src = root / "hub", root / "src"
    base = make_tiny_t5(src / "base", seed=3)
    fill_hub_cache(cache, hub["base"]["repo_id"], base, MAIN)
    for (name, expert), (rank, seed) in zip(hub["experts"].items(), [(8, 1), (4, 2)]):
        fill_hub_cache(cache, expert["repo_id"], make_t5_lora(base, src / name, rank, 2 * rank, seed), expert["revision"])
    competition_csvs(repo / "data-src")
    env = {**env, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf-home")}

    out = run(["mergeflow", "use", "recipes/flan-t5-competition.yaml"], repo, env)
    assert "experts wiki_qa, hotpotqa (hub), method regmean" in out
    assert f"params.yaml: models.hub.base.revision: main -> {MAIN}" in out
    params = deep_update(yaml.safe_load((repo / "params.yaml").read_text()), CPU)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro", "evaluate", "submit"], repo, env)
    assert ran(out) == {"download-base", "download@wiki_qa", "download@hotpotqa", "download-eval", "gram@wiki_qa", "gram@hotpotqa", "fisher@wiki_qa", "fisher@hotpotqa", "merge", "evaluate", "submit"}  # fisher@: markers (method regmean)

    grams = json.loads((repo / "models" / "grams" / "wiki_qa" / "grams.json").read_text())
    assert grams["calibration"]["target_field"] == "target" and len(grams["modules"]) == 36  # every encoder and decoder Linear
    merged, experts = state(repo / "models" / "merged"), [state(repo / "models" / "experts" / e) for e in ("wiki_qa", "hotpotqa")]
    q = "decoder.block.1.layer.1.EncDecAttention.q.weight"  # a LoRA target, so the experts differ there
    assert not torch.equal(experts[0][q], experts[1][q])
    assert not torch.allclose(merged[q], (experts[0][q] + experts[1][q]) / 2)  # solved, not averaged
    metrics = json.loads((repo / "metrics" / "merged.json").read_text())
    assert 0 <= metrics["cosmos_qa"]["acc"] <= 1
    assert {"rouge1", "rouge2", "rougeL", "rougeLsum"} <= set(metrics["xsum"])
    submission = pd.read_csv(repo / "submission.csv", keep_default_na=False)
    assert list(submission.columns) == ["id", "prediction", "dummy_field"] and submission["id"].tolist() == list(range(5))
    assert submission.loc[[1, 3], "prediction"].astype(int).between(0, 3).all()
