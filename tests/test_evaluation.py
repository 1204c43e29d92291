"""lm-eval on the shipped toy tasks, cross-checked against plain greedy generation."""

from __future__ import annotations

import json

import pytest
import torch

from mergeflow.evaluation.harness import evaluate_model, flatten_results
from mergeflow.evaluation.tasks import shipped_tasks
from mergeflow.models import load_causal_lm


def test_flatten_keeps_numbers_and_names_filters():
    raw = {"t": {"alias": "t", "exact_match,none": 0.5, "exact_match_stderr,none": "N/A", "acc,strip": 1, "sample_len": 3}}
    assert flatten_results(raw) == {"t": {"exact_match": 0.5, "acc_strip": 1.0}}


def test_shipped_tasks():
    assert shipped_tasks() == ["toy_code", "toy_math"]


def greedy_exact_match(model_dir, rows):
    model, tok = load_causal_lm(model_dir)
    hits = 0
    for r in rows:
        ids = tok(r["prompt"], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        hits += tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).split("\n")[0] == r["answer"]
    return hits / len(rows)


def test_lm_eval_on_toy_tasks_matches_greedy_generation(experts, tmp_path):
    (tmp_path / "data/eval").mkdir(parents=True)
    model, tok = load_causal_lm(experts[0])
    rows = {}
    for skill, prompts in {"math": ["1+2=", "30+4=", "7+7="], "code": ["rev(ab)=", "rev(xyz)=", "rev(q)="]}.items():
        rows[skill] = []
        for i, p in enumerate(prompts):
            # make the first answer of each task what the model itself says, so exact match is not 0
            answer = ""
            if i == 0:
                out = model.generate(**tok(p, return_tensors="pt"), max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
                answer = tok.decode(out[0, len(p):], skip_special_tokens=True).split("\n")[0]
            rows[skill].append({"prompt": p, "answer": answer or "zz"})
        (tmp_path / f"data/eval/{skill}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[skill]))
    out = tmp_path / "metrics.json"
    metrics = evaluate_model(experts[0], ["toy_math", "toy_code"], out, data_root=tmp_path, batch_size=4)
    assert json.loads(out.read_text()) == metrics
    for skill in ("math", "code"):
        expected = greedy_exact_match(experts[0], rows[skill])
        assert expected >= 1 / 3
        assert metrics[f"toy_{skill}"]["exact_match"] == pytest.approx(expected)


def test_unknown_task_is_refused(experts, tmp_path):
    with pytest.raises(ValueError, match=r"unknown lm-eval tasks \['toy_poetry'\].*shipped: \['toy_code', 'toy_math'\]"):
        evaluate_model(experts[0], ["toy_poetry"], tmp_path / "m.json", data_root=tmp_path)
    assert not (tmp_path / "m.json").exists()
