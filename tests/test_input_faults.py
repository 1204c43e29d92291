"""Issue 14, the inputs side: bad test.csv files, contexts longer than the model, broken or
incomplete params files. Each is refused (or warned about) in one line naming the file and the
row or key, and an earlier good output is left byte for byte as it was."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from helpers import bytes_lost, make_tiny_llama, report

from mergeflow.params import DataParams, load_params
from mergeflow.submission import write_submission

ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the checkout (main) or beside the folder of worktrees
SEED_TEST = next((d / "shared" for d in (ROOT.parent, ROOT.parent.parent) if (d / "shared").is_dir()), ROOT.parent / "shared") / "seed-data" / "llm-merging" / "data" / "test.csv"
needs_seed = pytest.mark.skipif(not SEED_TEST.is_file(), reason="../shared/seed-data is not beside this checkout")
GOOD = b"id,prediction,dummy_field\n0,1,0\n1,some text,0\n"
HEADER = "id,input,eval_type,answer_choices\n"


def record(record_property, fault: str, outcome: str, kept: Path, before: bytes) -> None:
    """Report to the fault table (benchmarks/faults.py); bytes lost: the earlier output's, if it changed."""
    lost = bytes_lost({kept.name: before}, kept)
    report(record_property, fault, outcome, lost)
    assert lost == 0, f"{kept} changed"


@pytest.fixture
def good_submission(tmp_path) -> Path:
    out = tmp_path / "submission.csv"
    out.write_bytes(GOOD)
    return out


def seed_rows(path: Path, ids: list[int]) -> Path:
    """Rows of the competition's real test.csv, as they are (long inputs included)."""
    test = pd.read_csv(SEED_TEST, dtype=str, keep_default_na=False)
    test[test["id"].isin([str(i) for i in ids])].to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def short_model(tmp_path_factory) -> Path:
    """A tiny Llama with 64 positions, as the toy zoo's models."""
    return make_tiny_llama(tmp_path_factory.mktemp("short") / "model", seed=5)


# --- test.csv -------------------------------------------------------------------------------

@pytest.mark.faults
def test_header_only_test_csv_keeps_the_previous_submission(tmp_path, good_submission, record_property):
    test = tmp_path / "test.csv"
    test.write_text(HEADER)
    proc = subprocess.run([sys.executable, "-m", "mergeflow", "submit", "--model", tmp_path, "--test", test, "--out", good_submission], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr == f"mergeflow: error: {test}: no rows, only the header: refusing to write an empty {good_submission}; {good_submission} is left as it was; give the competition's test.csv\n"
    record(record_property, "header-only test.csv (submit)", "refused: previous submission.csv kept", good_submission, GOOD)


def test_pipeline_without_a_test_csv_writes_a_header_only_submission(tmp_path, caplog):
    """The DVC stage's case: download wrote a header-only data/test.csv because data.test_csv is unset."""
    test = tmp_path / "test.csv"
    test.write_text(HEADER)
    write_submission(tmp_path / "no-model", test, tmp_path / "submission.csv", allow_empty=True)  # the model is never loaded
    assert (tmp_path / "submission.csv").read_text() == "id,prediction,dummy_field\n"
    assert "has no rows (params.yaml: data.test_csv is not set, so this workload has no competition file)" in caplog.text


@pytest.mark.faults
def test_download_refuses_a_header_only_data_test_csv(tmp_path, record_property):
    from mergeflow.zoo.sources import copy_eval_data

    calib, test = tmp_path / "calib.jsonl", tmp_path / "empty.csv"
    calib.write_text('{"text": "a"}\n')
    test.write_text(HEADER)
    previous = tmp_path / "data" / "test.csv"
    previous.parent.mkdir()
    previous.write_bytes(b"id,input,eval_type,answer_choices\n0,x,generation,\n")
    with pytest.raises(ValueError) as err:
        copy_eval_data(DataParams(calib={"a": str(calib)}, test_csv=str(test)), ["a"], tmp_path / "data")
    assert str(err.value) == f"{test}: no rows, only the header (params.yaml: data.test_csv); give the competition's test.csv, or unset data.test_csv"
    record(record_property, "header-only data.test_csv (download)", "refused: data/test.csv kept", previous, b"id,input,eval_type,answer_choices\n0,x,generation,\n")


@pytest.mark.faults
@pytest.mark.parametrize(("name", "content", "message"), [
    ("empty input in test.csv", HEADER.encode() + b"0,q,generation,\n7,  ,generation,\n", "{path}: row id=7: empty input; every row needs the text to answer (fill it in or drop the row)"),
    ("non-UTF-8 test.csv", HEADER.encode() + "0,caf\u00e9,generation,\n".encode("latin-1"), "{path}: not UTF-8 text (byte 0xe9 on line 2 (offset 39)); re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8`"),
    ("0-byte test.csv", b"", "{path}: empty file (0 bytes); expected the header id,input,eval_type,answer_choices and one row per question (the competition's test.csv)"),
])
def test_bad_test_csv_is_one_line_naming_the_file(tmp_path, good_submission, record_property, name, content, message):
    path = tmp_path / "test.csv"
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        write_submission(tmp_path / "no-model", path, good_submission)
    assert str(err.value) == message.format(path=path)
    record(record_property, name, "refused: one line naming the file", good_submission, GOOD)


# --- contexts longer than the model -----------------------------------------------------------

@needs_seed
@pytest.mark.faults
def test_submit_defaults_answer_real_long_rows_on_a_64_position_model(short_model, tmp_path, caplog, record_property):
    """`mergeflow submit` with its own defaults (max_new_tokens 16, from params.py) on real rows
    longer than the model: a 3359-character generation and an 859-character multiple choice."""
    from mergeflow.cli import main

    test = seed_rows(tmp_path / "test.csv", [353, 549])
    out = tmp_path / "submission.csv"
    result = CliRunner().invoke(main, ["submit", "--model", str(short_model), "--test", str(test), "--out", str(out), "--backend", "hf"])
    assert result.exit_code == 0, result.output
    sub = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert sub["id"].tolist() == ["353", "549"] and sub["prediction"][0] in {"0", "1", "2", "3"} and sub["prediction"][1].strip()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"{test}: row id=353, 549: input longer than the model's 64 tokens (max_position_embeddings 64) allows; left-truncated as lm-eval does " \
           "(generation keeps the last 48 tokens, multiple choice what fits before each choice)" in warnings
    assert not any(w.startswith(("Combined length", "Left truncation")) for w in warnings)  # lm-eval's per-row warnings: said once above
    record_property("fault", "real test.csv rows longer than a 64-position model, submit defaults")
    record_property("outcome", "recovered: left-truncated as lm-eval, one warning")
    record_property("bytes_lost", 0)


@needs_seed
@pytest.mark.faults
def test_a_choice_longer_than_the_model_is_refused_naming_the_row(short_model, tmp_path, good_submission, record_property):
    from mergeflow.params import EvalParams

    test = seed_rows(tmp_path / "test.csv", [17, 353])  # row 17's longest choice: 66 characters, 67 tokens after the delimiter
    with pytest.raises(ValueError) as err:
        write_submission(short_model, test, good_submission, params=EvalParams(backend="hf"))
    assert str(err.value) == (f"{test}: row id=17: an answer choice is longer than the model's 64 tokens (max_position_embeddings 64), "
                              "which lm-eval cannot score; use a model with a longer context, or drop the row")
    record(record_property, "answer choice longer than the model", "refused: row id and max_position_embeddings", good_submission, GOOD)


@pytest.mark.faults
def test_max_new_tokens_that_fill_the_model_are_refused(short_model, tmp_path, good_submission, record_property):
    from mergeflow.params import EvalParams

    test = tmp_path / "test.csv"
    test.write_text(HEADER + "0,rev(ab)=,generation,\n")
    with pytest.raises(ValueError) as err:
        write_submission(short_model, test, good_submission, params=EvalParams(backend="hf"), max_new_tokens=64)
    assert str(err.value) == ("submit.max_new_tokens (--max-new-tokens) is 64 but the model takes 64 tokens (max_position_embeddings 64) in all, "
                              "leaving none for the input; use fewer than 64")
    record(record_property, "max_new_tokens = the model's length", "refused: one line with the limit", good_submission, GOOD)


# --- params files ---------------------------------------------------------------------------

@pytest.mark.faults
def test_yaml_syntax_error_names_file_line_and_column(tmp_path, record_property):
    from mergeflow.recipes import use_recipe

    bad = tmp_path / "recipe.yaml"
    bad.write_text("alpha: 0.1\nmethod: regmean\n  experts: [a]\n")
    message = f"{bad}:3:10: YAML syntax error: mapping values are not allowed here; fix the file at this line and column"
    with pytest.raises(ValueError) as err:
        load_params(bad)
    assert str(err.value) == message
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    with pytest.raises(ValueError, match="YAML syntax error"):  # mergeflow use
        use_recipe(bad, params, None)
    from mergeflow.cli import main

    result = CliRunner().invoke(main, ["plan", "--params", str(bad)])  # mergeflow plan
    assert str(result.exception) == message
    stage = subprocess.run([sys.executable, "stages/merge.py", "--params", bad, "--experts", tmp_path, "--grams", tmp_path, "--base", tmp_path, "--out", tmp_path / "merged"],
                           cwd=ROOT, capture_output=True, text=True)
    assert (stage.returncode, stage.stderr) == (1, f"merge.py: error: {message}\n")
    assert not (tmp_path / "merged").exists()
    record(record_property, "YAML syntax error in params (stage, plan, use)", "refused: file:line:column", params, (ROOT / "params.yaml").read_bytes())


@pytest.mark.faults
@pytest.mark.parametrize(("text", "message"), [
    ("alpha: true\n", "alpha: Input should be a valid number, got True"),
    ("gram:\n  text_field: 5\n", "gram.text_field: Input should be a valid string, got 5"),
    ("gram:\n  max_length: 12.5\n", "gram.max_length: Input should be a valid integer, got 12.5"),
    ("gram:\n  include_lm_head: 'yes'\n", "gram.include_lm_head: Input should be a valid boolean, got 'yes'"),
])
def test_values_of_the_wrong_type_are_not_coerced(tmp_path, record_property, text, message):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_params(path)
    assert str(err.value) == f"{path}: invalid parameters:\n  {message}"
    record_property("fault", f"params `{' '.join(text.split())}` (was coerced)")
    record_property("outcome", "refused: key and value named")
    record_property("bytes_lost", 0)


@pytest.mark.faults
def test_a_stage_refuses_a_params_file_missing_its_keys(tmp_path, record_property):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    del params["merge"]["solver_dtype"], params["merge"]["density"], params["alpha"]  # density: a knob regmean does not read
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    load_params(path)  # the `mergeflow` commands take the defaults
    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "stages/merge.py", "--params", path, "--experts", tmp_path, "--grams", tmp_path, "--base", tmp_path, "--out", out],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr == (f"merge.py: error: {path}: missing keys alpha, merge.solver_dtype; a stage reads every key of its params from the file, "
                           "never a default: add them (the shipped params.yaml and recipes/*.yaml list every key)\n")
    assert not out.exists()
    record_property("fault", "stage run with a params file missing keys")
    record_property("outcome", "refused: missing keys named")
    record_property("bytes_lost", 0)



@pytest.mark.faults
def test_use_refuses_a_recipe_the_stages_would_refuse(tmp_path, record_property):
    from mergeflow.recipes import use_recipe

    recipe = yaml.safe_load((ROOT / "recipes" / "llama3-code-math.yaml").read_text())
    del recipe["gram"]["checkpoint_every"], recipe["submit"]
    bad = tmp_path / "partial.yaml"
    bad.write_text(yaml.safe_dump(recipe))
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    with pytest.raises(ValueError) as err:
        use_recipe(bad, params, None)
    assert str(err.value).startswith(f"{bad}: missing keys gram.checkpoint_every, submit; a stage reads every key of its params from the file")
    record(record_property, "mergeflow use with a recipe missing keys", "refused: missing keys named, params.yaml kept", params, (ROOT / "params.yaml").read_bytes())


@pytest.mark.faults
def test_non_utf8_params_file_is_one_line(tmp_path, record_property):
    path = tmp_path / "params.yaml"
    path.write_bytes("alpha: 0.1  # caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError) as err:
        load_params(path)
    assert str(err.value).startswith(f"{path}: not a readable YAML file (") and str(err.value).endswith("); save it as UTF-8 YAML")
    assert "\n" not in str(err.value)
    record_property("fault", "non-UTF-8 params file")
    record_property("outcome", "refused: one line naming the file")
    record_property("bytes_lost", 0)
