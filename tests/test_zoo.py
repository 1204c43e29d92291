"""The embedded toy zoo: loadable HF models, deterministic builds, disjoint data."""

from __future__ import annotations

import json

import pytest

from mergeflow.params import ToyZooParams
from mergeflow.submission import read_test_csv
from mergeflow.zoo import skills
from mergeflow.zoo.tokenizer import build_tokenizer
from mergeflow.zoo.toy import build_toy_zoo

TINY = ToyZooParams(hidden_size=32, intermediate_size=48, num_layers=1, batch_size=8, base_steps=3, expert_steps=3, calib_samples=16, eval_samples=10, test_rows=6)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    build_toy_zoo(TINY, ["math", "code"], root / "models", root / "data")
    return root


def test_tokenizer_round_trips_characters():
    tok = build_tokenizer(64)
    text = "rev(abc)=cba\n1397+5=1402"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text


def test_zoo_models_load_with_transformers(zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("base", "experts/math", "experts/code"):
        d = zoo / "models" / name
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in d.iterdir()}
        model = AutoModelForCausalLM.from_pretrained(d)
        config = model.config
        assert config.model_type == "llama" and config.num_key_value_heads < config.num_attention_heads
        assert AutoTokenizer.from_pretrained(d).decode(AutoTokenizer.from_pretrained(d)("12+3=")["input_ids"]) == "12+3="


def test_zoo_build_is_deterministic(zoo, tmp_path):
    build_toy_zoo(TINY, ["math", "code"], tmp_path / "models", tmp_path / "data")
    for rel in ("models/base/model.safetensors", "models/experts/code/model.safetensors", "data/calib/math.jsonl", "data/test.csv"):
        assert (tmp_path / rel).read_bytes() == (zoo / rel).read_bytes(), rel


def test_eval_data_is_disjoint_from_calibration_and_correct(zoo):
    for skill in ("math", "code"):
        evaluation = [json.loads(line) for line in (zoo / "data/eval" / f"{skill}.jsonl").read_text().splitlines()]
        calib = {json.loads(line)["text"].split("=")[0] for line in (zoo / "data/calib" / f"{skill}.jsonl").read_text().splitlines()}
        assert len(evaluation) == 10 and not {e["prompt"].rstrip("=") for e in evaluation} & calib
        for e in evaluation:
            if skill == "math":
                a, b = e["prompt"].rstrip("=").split("+")
                assert int(e["answer"]) == int(a) + int(b)
            else:
                assert e["answer"] == e["prompt"][4:-2][::-1]


def test_toy_test_csv_is_in_competition_format(zoo):
    test = read_test_csv(zoo / "data/test.csv")
    assert len(test) == 12 and test["id"].tolist() == list(range(12))
    assert set(test["eval_type"]) == {"multiple_choice", "generation"}


def test_unknown_toy_expert_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"experts \['poetry'\] have no toy skill"):
        build_toy_zoo(TINY, ["math", "poetry"], tmp_path / "m", tmp_path / "d")
    with pytest.raises(ValueError, match="unknown toy skill"):
        skills.sample("poetry", 1, 0)


@pytest.mark.faults
def test_expert_stage_killed_while_training_leaves_no_data_without_its_model(zoo, tmp_path, monkeypatch, record_property):
    """download@<expert> writes the model first and its calibration data last, each atomically:
    a kill during training leaves neither (DVC reruns the stage, which it never recorded)."""
    import shutil

    from mergeflow.zoo import toy

    shutil.copytree(zoo / "models" / "base", tmp_path / "models" / "base")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(toy, "train", killed)
    with pytest.raises(KeyboardInterrupt):
        toy.build_expert(TINY, "math", tmp_path / "models", tmp_path / "data")
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() and "base" not in p.parts)
    record_property("fault", "download@math killed while training the expert")
    record_property("outcome", "recovered: no model, no calibration data, stage not recorded" if not left else f"debris: {left}")
    record_property("bytes_lost", 0)
    assert left == []
