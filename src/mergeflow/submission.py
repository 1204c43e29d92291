"""The LLM-Merging competition's submission: answer every row of `test.csv`, write `submission.csv`.

`test.csv` has columns `id,input,eval_type,answer_choices`; `eval_type` is `multiple_choice`
(answer_choices a Python-literal list) or `generation`. Multiple-choice rows get the index of the
choice with the highest summed log-likelihood given the raw input (every token of the choice
counts, after the input and `choice_delimiter`, as lm-eval's multiple-choice tasks do, so
`cosmos_qa` validation accuracy measures exactly this); generation rows get the greedy
continuation. Both go through lm-eval's model interface (`loglikelihood`, `generate_until`) on
the backend `eval.backend` picks (HF or vLLM), which handles batching and the token boundary.
"""

from __future__ import annotations

import ast
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from .io import atomic_file
from .params import EvalParams

log = logging.getLogger(__name__)
COLUMNS = ["id", "input", "eval_type", "answer_choices"]
EVAL_TYPES = {"multiple_choice", "generation"}
EMPTY_PREDICTION = "<no answer>"


def read_test_csv(path: str | Path) -> pd.DataFrame:
    """Read and validate `test.csv`; multiple-choice rows get their choices parsed (safely)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: test file not found (params.yaml: data.test_csv, or the download stage's data/test.csv)")
    frame = pd.read_csv(path, dtype={"input": str, "eval_type": str, "answer_choices": str}, keep_default_na=False)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; expected {COLUMNS}")
    duplicated = frame["id"][frame["id"].duplicated()].tolist()
    if duplicated:
        raise ValueError(f"{path}: duplicate ids {duplicated[:5]}; every row needs its own id")
    bad = sorted(set(frame["eval_type"]) - EVAL_TYPES)
    if bad:
        raise ValueError(f"{path}: unknown eval_type values {bad}; expected {sorted(EVAL_TYPES)}")
    choices = []
    for row in frame.itertuples():
        if row.eval_type != "multiple_choice":
            choices.append(None)
            continue
        try:
            parsed = ast.literal_eval(row.answer_choices)
        except (ValueError, SyntaxError):
            parsed = None
        if not isinstance(parsed, (list, tuple)) or len(parsed) < 2:
            raise ValueError(f"{path}: row id={row.id}: answer_choices {row.answer_choices!r} is not a list of at least two choices")
        choices.append([str(c) for c in parsed])
    frame["choices"] = choices
    return frame


def validate_submission(frame: pd.DataFrame, test: pd.DataFrame) -> None:
    """Every test id once, in order, and no empty prediction; a multiple-choice index in range."""
    if list(frame.columns) != ["id", "prediction", "dummy_field"]:
        raise ValueError(f"submission columns are {list(frame.columns)}, expected ['id', 'prediction', 'dummy_field']")
    if frame["id"].tolist() != test["id"].tolist():
        raise ValueError("submission ids differ from test.csv's ids (each must appear once, in order)")
    empty = frame.index[frame["prediction"].astype(str).str.strip() == ""].tolist()
    if empty:
        raise ValueError(f"submission has empty predictions for ids {frame['id'][empty].tolist()[:5]}")
    for (_, sub), (_, row) in zip(frame.iterrows(), test.iterrows()):
        if row["eval_type"] == "multiple_choice" and not 0 <= int(sub["prediction"]) < len(row["choices"]):
            raise ValueError(f"submission id={sub['id']}: choice index {sub['prediction']} out of range")


def predict(lm, test: pd.DataFrame, *, max_new_tokens: int, stop: Sequence[str], choice_delimiter: str = " ") -> list[str]:
    """Predictions for every row of `test` with an lm-eval LM (`loglikelihood`, `generate_until`)."""
    from lm_eval.api.instance import Instance

    mc_requests, mc_rows = [], []
    gen_requests, gen_rows = [], []
    for i, row in enumerate(test.itertuples()):
        if row.eval_type == "multiple_choice":
            for choice in row.choices:
                mc_requests.append(Instance("loglikelihood", {}, (row.input, choice_delimiter + choice), len(mc_requests)))
                mc_rows.append(i)
        else:
            args = {"until": list(stop), "max_gen_toks": max_new_tokens, "do_sample": False}
            gen_requests.append(Instance("generate_until", {}, (row.input, args), len(gen_requests)))
            gen_rows.append(i)
    predictions: list[str | None] = [None] * len(test)
    if mc_requests:
        best: dict[int, tuple[float, int]] = {}
        choice_index: dict[int, int] = {}
        for row, (logprob, _) in zip(mc_rows, lm.loglikelihood(mc_requests)):
            k = choice_index[row] = choice_index.get(row, -1) + 1
            if row not in best or logprob > best[row][0]:
                best[row] = (logprob, k)
        for row, (_, k) in best.items():
            predictions[row] = str(k)
    if gen_requests:
        texts = lm.generate_until(gen_requests)
        empty = 0
        for row, text in zip(gen_rows, texts):
            text = text.strip()
            empty += not text
            predictions[row] = text or EMPTY_PREDICTION
        if empty:
            log.warning("%d generation rows produced no text; wrote %r for them", empty, EMPTY_PREDICTION)
    return predictions  # type: ignore[return-value]


def write_submission(
    model_dir: str | Path,
    test_csv: str | Path,
    out: str | Path,
    *,
    params: EvalParams | None = None,
    max_new_tokens: int = 64,
    stop: Sequence[str] = ("\n",),
    choice_delimiter: str = " ",
    lm=None,
) -> pd.DataFrame:
    """Answer `test_csv` with the model in `model_dir` and write a validated `submission.csv`.

    `params` (the `eval` group) picks the backend and its arguments; `lm` is an lm-eval LM to use
    instead of loading `model_dir`.
    """
    from .evaluation.backends import make_lm

    test = read_test_csv(test_csv)
    lm = lm if lm is not None else make_lm(model_dir, params or EvalParams())
    predictions = predict(lm, test, max_new_tokens=max_new_tokens, stop=stop, choice_delimiter=choice_delimiter)
    frame = pd.DataFrame({"id": test["id"], "prediction": predictions, "dummy_field": 0})
    validate_submission(frame, test)
    with atomic_file(out) as tmp:
        frame.to_csv(tmp, index=False)
    log.info("wrote %s: %d rows (%d multiple choice)", out, len(frame), int((test["eval_type"] == "multiple_choice").sum()))
    return frame
