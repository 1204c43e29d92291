"""test.csv -> submission.csv: parsing the competition's format, choosing, validating, writing."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from eval_helpers import competition_rows, write_competition_csv

from mergeflow.params import EvalParams, SubmitParams
from mergeflow.submission import (
    EMPTY_PREDICTION,
    predict,
    read_test_csv,
    validate_submission,
    write_submission,
)


class FakeLM:
    """An lm-eval-style LM whose log-likelihood prefers the continuation equal to `favourite`."""

    def __init__(self, favourite: str, generation: str):
        self.favourite, self.generation = favourite, generation
        self.requests: list = []

    def loglikelihood(self, requests):
        self.requests += requests
        return [(0.0 if r.args[1].strip() == self.favourite else -5.0 - len(r.args[1]), False) for r in requests]

    def generate_until(self, requests):
        self.requests += requests
        return [self.generation for _ in requests]


def write_csv(path: Path, rows: list[tuple]) -> Path:
    pd.DataFrame(rows, columns=["id", "input", "eval_type", "answer_choices"]).to_csv(path, index=False)
    return path


def test_reads_a_test_csv_with_the_competitions_traits(tmp_path):
    rows = competition_rows()
    test = read_test_csv(write_competition_csv(tmp_path / "test.csv", rows))
    assert test["id"].tolist() == list(range(807)) and test["input"].tolist() == [r["input"] for r in rows]
    assert test["eval_type"].tolist() == [r["eval_type"] for r in rows]
    assert test["choices"].tolist() == [r["choices"] for r in rows]  # commas, quotes, "NA" and "None" kept as written
    assert set(test["choices"].dropna().map(len)) == {2, 4, 8}


def test_predict_picks_the_most_likely_choice_and_generates(tmp_path):
    test = read_test_csv(write_csv(tmp_path / "t.csv", [(0, "1+1=", "multiple_choice", "['3', '2', '11']"), (1, "rev(ab)=", "generation", ""), (2, "q", "multiple_choice", "['x', 'y']")]))
    lm = FakeLM(favourite="2", generation=" ba ")
    assert predict(lm, test, max_new_tokens=4, stop=["\n"]) == ["1", "ba", "0"]
    contexts = [(r.request_type, r.args[0], r.args[1]) for r in lm.requests if r.request_type == "loglikelihood"]
    assert contexts[:3] == [("loglikelihood", "1+1=", " 3"), ("loglikelihood", "1+1=", " 2"), ("loglikelihood", "1+1=", " 11")]
    gen = next(r for r in lm.requests if r.request_type == "generate_until")
    assert gen.args == ("rev(ab)=", {"until": ["\n"], "max_gen_toks": 4, "do_sample": False})


def test_empty_generation_gets_a_visible_placeholder(tmp_path):
    test = read_test_csv(write_csv(tmp_path / "t.csv", [(0, "x", "generation", "")]))
    assert predict(FakeLM("", "  "), test, max_new_tokens=4, stop=["\n"]) == [EMPTY_PREDICTION]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([(0, "x", "ranking", "")], r"unknown eval_type values \['ranking'\]"),
        ([(0, "x", "multiple_choice", "not a list")], r"row id=0: answer_choices 'not a list' is not a list"),
        ([(0, "x", "multiple_choice", "['only one']")], r"at least two choices"),
        ([(0, "x", "multiple_choice", "['a', 'b'"), (1, "y", "generation", "")], r"row id=0: answer_choices \"\['a', 'b'\" is not a list"),
        ([(0, "x", "generation", ""), (1, "y", "generation", ""), (0, "z", "generation", "")], r"duplicate ids \[0\]; every row needs its own id"),
    ],
)
def test_bad_test_csv_is_refused(tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        read_test_csv(write_csv(tmp_path / "t.csv", rows))


def test_missing_columns_and_file_are_refused(tmp_path):
    (tmp_path / "t.csv").write_text("id,input\n0,x\n")
    with pytest.raises(ValueError, match=r"missing columns \['eval_type', 'answer_choices'\]"):
        read_test_csv(tmp_path / "t.csv")
    with pytest.raises(FileNotFoundError, match="nope.csv: test file not found"):
        read_test_csv(tmp_path / "nope.csv")


def test_validation_refuses_reordered_ids_and_bad_indices(tmp_path):
    test = read_test_csv(write_csv(tmp_path / "t.csv", [(0, "a", "multiple_choice", "['x', 'y']"), (1, "b", "generation", "")]))
    good = pd.DataFrame({"id": [0, 1], "prediction": ["1", "text"], "dummy_field": 0})
    validate_submission(good, test)
    with pytest.raises(ValueError, match="ids differ"):
        validate_submission(good.iloc[::-1].reset_index(drop=True), test)
    with pytest.raises(ValueError, match="choice index 2 out of range"):
        validate_submission(good.assign(prediction=["2", "text"]), test)
    with pytest.raises(ValueError, match=r"empty predictions for ids \[1\]"):
        validate_submission(good.assign(prediction=["1", " "]), test)


def greedy_answers(model_dir: Path, test: pd.DataFrame, max_new_tokens: int) -> list[str]:
    """What the model answers, computed here with transformers alone: the choice whose tokens
    after the input and a space have the highest summed log-probability, or the greedy
    continuation up to the first newline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    answers = []
    with torch.no_grad():
        for row in test.itertuples():
            context = encode(row.input)
            if row.eval_type == "multiple_choice":
                scores = []
                for choice in row.choices:
                    ids = encode(row.input + " " + choice)
                    logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
                    scores.append(sum(logprobs[i - 1, ids[i]].item() for i in range(len(context), len(ids))))
                answers.append(str(max(range(len(scores)), key=scores.__getitem__)))
            else:
                out = model.generate(torch.tensor([context]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
                answers.append(tok.decode(out[0, len(context):], skip_special_tokens=True).split("\n")[0].strip())
    return answers


def test_write_submission_with_a_real_model(experts, tmp_path):
    rows = [(0, "12+5=", "multiple_choice", "['17', '18', '7', '1']"), (1, "rev(abc)=", "generation", ""),
            (2, "1+1=", "multiple_choice", "['2', '3']"), (3, "cp(ab)=", "multiple_choice", "['b', 'ab', 'ba', 'a', 'abab']")]
    csv = write_csv(tmp_path / "test.csv", rows)
    write_submission(experts[0], csv, tmp_path / "submission.csv", params=EvalParams(backend="hf", hf={"batch_size": 2}), submit=SubmitParams(max_new_tokens=4))
    out = pd.read_csv(tmp_path / "submission.csv", dtype=str, keep_default_na=False)
    expected = greedy_answers(experts[0], read_test_csv(csv), max_new_tokens=4)
    assert out["prediction"].tolist() == [e or EMPTY_PREDICTION for e in expected]
    assert len({expected[0], expected[2], expected[3]}) > 1  # the model does not prefer the first choice everywhere
    assert out["id"].tolist() == ["0", "1", "2", "3"] and out["dummy_field"].tolist() == ["0"] * 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_choice_delimiter_matches_lm_evals_multiple_choice(tmp_path):
    test = read_test_csv(write_csv(tmp_path / "t.csv", [(0, "q", "multiple_choice", "['x', 'y']")]))
    lm = FakeLM(favourite="y", generation="")
    assert predict(lm, test, max_new_tokens=4, stop=["\n"], choice_delimiter="") == ["1"]
    assert [r.args for r in lm.requests] == [("q", "x"), ("q", "y")]


def test_submission_answers_every_row_of_a_competition_format_test_csv(tmp_path):
    """200 rows with the competition's traits (long inputs left-truncated, a 152-character choice)
    with a toy model through the HF backend: every row answered, in order."""
    from eval_helpers import long_context_llama

    model = long_context_llama(tmp_path / "model", positions=256)
    test_csv = write_competition_csv(tmp_path / "test.csv", competition_rows(200))
    out = tmp_path / "submission.csv"
    write_submission(model, test_csv, out, params=EvalParams(backend="hf", hf={"batch_size": 32}), submit=SubmitParams(max_new_tokens=4))
    sub = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(sub.columns) == ["id", "prediction", "dummy_field"]
    assert sub["id"].tolist() == [str(i) for i in range(200)] and set(sub["dummy_field"]) == {"0"}
    choices = read_test_csv(test_csv)["choices"]
    for prediction, options in zip(sub["prediction"], choices):
        assert prediction.strip() != "" and (options is None or int(prediction) in range(len(options)))
