"""Experts given as LoRA adapters of different ranks are materialised onto their base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_llama, state

from mergeflow.params import Params
from mergeflow.zoo.sources import materialise


def make_lora(base: Path, out: Path, rank: int, alpha: int, seed: int, *, seq2seq: bool = False) -> Path:
    """A LoRA adapter with random (non-zero) A and B, as training leaves them: on q/v and down_proj
    of a Llama, or (`seq2seq`) on q and v of a T5, as the lorahub Flan-T5 experts."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q", "v"], task_type=TaskType.SEQ_2_SEQ_LM) if seq2seq else (
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj", "down_proj"]))
    model = get_peft_model((AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = make_tiny_llama(root / "base", seed=7)
    return base, make_lora(base, root / "r16", 16, 32, 1), make_lora(base, root / "r8", 8, 8, 2)


def local_params(root: Path, base: Path, experts: dict[str, Path]) -> Params:
    data = {"calib": {}, "eval": {}}
    for name in experts:
        for group in data:
            path = root / f"{group}-{name}.jsonl"
            path.write_text(json.dumps({"text": "1+1=2", "prompt": "1+1=", "answer": "2"}) + "\n")
            data[group][name] = str(path)
    (root / "test.csv").write_text("id,input,eval_type,answer_choices\n0,hi,generation,\n")
    return Params.model_validate({
        "experts": list(experts), "models": {"source": "local", "local": {"base": str(base), "experts": {k: str(v) for k, v in experts.items()}}},
        "data": {**data, "test_csv": str(root / "test.csv")},
    })


def test_lora_adapters_of_different_ranks_become_full_experts(adapter_zoo, tmp_path):
    from safetensors.torch import load_file

    base, r16, r8 = adapter_zoo
    info = materialise(local_params(tmp_path, base, {"a": r16, "b": r8}), tmp_path / "models", tmp_path / "data")
    assert {k: v["rank"] for k, v in info["adapters"].items()} == {"a": 16, "b": 8}
    base_w = state(base)
    for name, adapter, scale in (("a", r16, 32 / 16), ("b", r8, 8 / 8)):
        expert = tmp_path / "models" / "experts" / name
        assert (expert / "config.json").is_file() and (expert / "tokenizer.json").is_file() and not (expert / "adapter_config.json").exists()
        w = state(expert)
        assert set(w) == set(base_w)  # an ordinary model: no lora_ tensors left
        lora = load_file(adapter / "adapter_model.safetensors")
        for module in ("model.layers.1.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
            a = lora[f"base_model.model.{module}.lora_A.weight"]
            b = lora[f"base_model.model.{module}.lora_B.weight"]
            torch.testing.assert_close(w[f"{module}.weight"], base_w[f"{module}.weight"] + scale * b @ a, rtol=1e-5, atol=1e-6)
        assert torch.equal(w["model.layers.0.self_attn.k_proj.weight"], base_w["model.layers.0.self_attn.k_proj.weight"])
        assert torch.equal(w["model.embed_tokens.weight"], base_w["model.embed_tokens.weight"])


def test_weighted_merge_of_materialised_adapters(adapter_zoo, tmp_path):
    """The competition's example: two LoRAs of ranks 16 and 8 merged with weights 0.8/0.2."""
    from mergeflow.merge import merge_models
    from mergeflow.methods import get_method

    base, r16, r8 = adapter_zoo
    materialise(local_params(tmp_path, base, {"a": r16, "b": r8}), tmp_path / "models", tmp_path / "data")
    experts = [tmp_path / "models" / "experts" / e for e in ("a", "b")]
    merge_models(experts, get_method("average")({"weights": [0.8, 0.2]}), tmp_path / "merged")
    a, b, m = (state(p) for p in (*experts, tmp_path / "merged"))
    for name in m:
        torch.testing.assert_close(m[name], 0.8 * a[name] + 0.2 * b[name])


def test_adapter_without_its_base_is_a_clear_error(adapter_zoo, tmp_path):
    from mergeflow.zoo.adapters import materialise_adapter

    _, r16, _ = adapter_zoo
    with pytest.raises(FileNotFoundError, match=r"nobase: no config\.json; the adapter .* needs its full base model"):
        materialise_adapter(r16, tmp_path / "nobase", tmp_path / "out")
    assert not (tmp_path / "out").exists()
