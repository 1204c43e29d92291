"""The LLM-Merging competition's submission: answer every row of `test.csv`, write `submission.csv`.

`test.csv` has columns `id,input,eval_type,answer_choices`; `eval_type` is `multiple_choice`
(answer_choices a Python-literal list) or `generation`. Multiple-choice rows get the index of the
choice with the highest summed log-likelihood given the raw input (every token of the choice
counts, after the input and `choice_delimiter`, as lm-eval's multiple-choice tasks do, so
`cosmos_qa` validation accuracy measures exactly this); generation rows get the greedy
continuation. Both go through lm-eval's model interface (`loglikelihood`, `generate_until`) on
the backend `eval.backend` picks (HF or vLLM), which handles batching and the token boundary.

Inputs longer than the model are left-truncated the way lm-eval does (a generation row keeps its
last `max_length - max_new_tokens` tokens; a multiple-choice row keeps what fits before each
choice), with one warning listing the rows; what lm-eval cannot do (a choice longer than the
model, no room left to generate) is refused in one line naming the rows and the model's length.
A `test.csv` without rows is refused (`mergeflow submit`): it would write an empty submission
over a good one. Only the DVC stage, whose download writes a header-only `data/test.csv` when
`data.test_csv` is unset, writes a header-only `submission.csv`, and says so.
"""

from __future__ import annotations

import ast
import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd

from .atomic import atomic_file
from .params import EvalParams, SubmitParams

log = logging.getLogger(__name__)
COLUMNS = ["id", "input", "eval_type", "answer_choices"]
EVAL_TYPES = {"multiple_choice", "generation"}
EMPTY_PREDICTION = "<no answer>"


def read_test_csv(path: str | Path) -> pd.DataFrame:
    """Read and validate `test.csv`; multiple-choice rows get their choices parsed (safely)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: test file not found")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes); expected the header {','.join(COLUMNS)} and one row per question (the competition's test.csv)")
    try:
        frame = pd.read_csv(path, dtype={"input": str, "eval_type": str, "answer_choices": str}, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text ({_first_bad_byte(path)}); re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8`") from None
    except pd.errors.ParserError as err:
        raise ValueError(f"{path}: not a readable CSV ({' '.join(str(err).split())}); expected the columns {','.join(COLUMNS)}") from None
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; expected {COLUMNS}")
    empty = frame["id"][frame["input"].str.strip() == ""].tolist()
    if empty:
        raise ValueError(f"{path}: row id={_ids(empty)}: empty input; every row needs the text to answer (fill it in or drop the row)")
    duplicated = frame["id"][frame["id"].duplicated()].tolist()
    if duplicated:
        raise ValueError(f"{path}: duplicate ids {duplicated[:5]}; every row needs its own id")
    bad = sorted(set(frame["eval_type"]) - EVAL_TYPES)
    if bad:
        raise ValueError(f"{path}: unknown eval_type values {bad}; expected {sorted(EVAL_TYPES)}")
    try:
        frame["choices"] = [parse_choices(row.answer_choices, row.id) if row.eval_type == "multiple_choice" else None for row in frame.itertuples()]
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return frame


def parse_choices(text: str, row_id: object) -> list[str]:
    """A row's `answer_choices`, a Python-literal list, read safely (`ast.literal_eval`) as strings."""
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        parsed = None
    if not isinstance(parsed, (list, tuple)) or len(parsed) < 2:
        raise ValueError(f"row id={row_id}: answer_choices {text!r} is not a list of at least two choices")
    return [str(c) for c in parsed]


def _first_bad_byte(path: Path) -> str:
    """`byte 0xe9 on line 2 (offset 41)`: where a file stops being UTF-8 (pandas reports a chunk's offset)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return f"byte {data[err.start]:#04x} on line {line} (offset {err.start})"
    return "undecodable bytes"


def _ids(ids: Sequence, shown: int = 5) -> str:
    """`17` or `17, 28, 45, ... (35 rows)`: the rows a message is about, in one line."""
    ids = [str(i) for i in ids]
    return ", ".join(ids) if len(ids) <= shown else f"{', '.join(ids[:shown])}, ... ({len(ids)} rows)"


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


def _model_length(lm) -> str:
    mpe = getattr(getattr(lm, "config", None), "max_position_embeddings", None)
    return f"{lm.max_length} tokens" + (f" (max_position_embeddings {mpe})" if mpe else "")


def check_lengths(lm, test: pd.DataFrame, *, max_new_tokens: int, choice_delimiter: str, where: str = "test.csv") -> None:
    """Refuse what lm-eval cannot answer within the model's length, in one line naming the rows;
    warn once about the inputs lm-eval will left-truncate. An LM without `max_length` and
    `_encode_pair` (a test double) is not checked."""
    if not (hasattr(lm, "max_length") and hasattr(lm, "_encode_pair")):
        return
    max_length = lm.max_length
    if getattr(lm, "backend", "causal") == "seq2seq":  # the encoder takes the input, the decoder the answer: no shared budget
        _check_seq2seq_lengths(lm, test, choice_delimiter=choice_delimiter, where=where)
        return
    generation = test[test["eval_type"] != "multiple_choice"]
    if len(generation) and max_new_tokens >= max_length:
        raise ValueError(f"max_new_tokens is {max_new_tokens} but the model takes {_model_length(lm)} in all, "
                         f"leaving none for the input; use fewer than {max_length}")
    too_long, truncated = [], []
    for row in test.itertuples():
        if row.eval_type == "multiple_choice":
            lengths = [tuple(map(len, lm._encode_pair(row.input, choice_delimiter + choice))) for choice in row.choices]
            if any(cont > max_length for _, cont in lengths):
                too_long.append(row.id)
            elif any(ctx + cont > max_length + 1 for ctx, cont in lengths):
                truncated.append(row.id)
        elif len(lm.tok_encode(row.input)) > max_length - max_new_tokens:
            truncated.append(row.id)
    if too_long:
        raise ValueError(f"{where}: row id={_ids(too_long)}: an answer choice is longer than the model's {_model_length(lm)}, which lm-eval "
                         "cannot score; use a model with a longer context, or drop the row")
    if truncated:
        log.warning("%s: row id=%s: input longer than the model's %s allows; left-truncated as lm-eval does (generation keeps the last "
                    "%d tokens, multiple choice what fits before each choice)", where, _ids(truncated), _model_length(lm), max_length - max_new_tokens)


def _check_seq2seq_lengths(lm, test: pd.DataFrame, *, choice_delimiter: str, where: str) -> None:
    """`check_lengths` for an encoder-decoder: lm-eval keeps the last `max_length` tokens of an
    input (the encoder's side) and scores a choice on the decoder's side."""
    too_long, truncated = [], []
    for row in test.itertuples():
        if len(lm.tok_encode(row.input)) > lm.max_length:
            truncated.append(row.id)
        if row.eval_type == "multiple_choice" and any(len(lm.tok_encode(choice_delimiter + c)) > lm.max_length for c in row.choices):
            too_long.append(row.id)
    if too_long:
        raise ValueError(f"{where}: row id={_ids(too_long)}: an answer choice is longer than the model's {_model_length(lm)}, which lm-eval "
                         "cannot score; use a model with a longer context, or drop the row")
    if truncated:
        log.warning("%s: row id=%s: input longer than the model's %s; left-truncated as lm-eval does (the encoder keeps the last %d tokens)",
                    where, _ids(truncated), _model_length(lm), lm.max_length)


class _DropTruncationWarnings(logging.Filter):
    """lm-eval warns once per truncated request; `check_lengths` has already said it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Combined length of context", "Left truncation applied"))


@contextlib.contextmanager
def _quiet_truncation() -> Iterator[None]:
    loggers = [logging.getLogger(f"lm_eval.models.{m}") for m in ("huggingface", "vllm_causallms")]
    drop = _DropTruncationWarnings()
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


def predict(lm, test: pd.DataFrame, *, max_new_tokens: int, stop: Sequence[str], choice_delimiter: str = " ", where: str = "test.csv") -> list[str]:
    """Predictions for every row of `test` with an lm-eval LM (`loglikelihood`, `generate_until`)."""
    from lm_eval.api.instance import Instance

    check_lengths(lm, test, max_new_tokens=max_new_tokens, choice_delimiter=choice_delimiter, where=where)

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
        with _quiet_truncation():
            scores = lm.loglikelihood(mc_requests)
        for row, (logprob, _) in zip(mc_rows, scores):
            k = choice_index[row] = choice_index.get(row, -1) + 1
            if row not in best or logprob > best[row][0]:
                best[row] = (logprob, k)
        for row, (_, k) in best.items():
            predictions[row] = str(k)
    if gen_requests:
        with _quiet_truncation():
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
    submit: SubmitParams | None = None,
    allow_empty: bool = False,
    lm=None,
) -> None:
    """Answer `test_csv` with the model in `model_dir` and write a validated `submission.csv`.

    `params` (the `eval` group) picks the backend and its arguments, `submit` how rows are
    answered (generation length, stop sequences, choice delimiter); `lm` is an lm-eval LM to use
    instead of loading `model_dir`. A `test_csv` without rows is refused (`out` is left as it
    was) unless `allow_empty`, which writes a header-only `out` without loading the model.
    """
    from .evaluation.backends import make_lm

    test = read_test_csv(test_csv)
    if test.empty and not allow_empty:
        kept = f"; {out} is left as it was" if Path(out).exists() else ""
        raise ValueError(f"{test_csv}: no rows, only the header: refusing to write an empty {out}{kept}; give the competition's test.csv")
    if test.empty:
        predictions: list[str] = []
        log.warning("%s has no rows (this workload has no competition file): %s gets the header only", test_csv, out)
    else:
        lm = lm if lm is not None else make_lm(model_dir, params or EvalParams())
        s = submit or SubmitParams()
        predictions = predict(lm, test, max_new_tokens=s.max_new_tokens, stop=s.stop, choice_delimiter=s.choice_delimiter, where=str(test_csv))
    frame = pd.DataFrame({"id": test["id"], "prediction": predictions, "dummy_field": 0})
    validate_submission(frame, test)
    with atomic_file(out) as tmp:
        frame.to_csv(tmp, index=False)
    log.info("wrote %s: %d rows (%d multiple choice)", out, len(frame), int((test["eval_type"] == "multiple_choice").sum()))
