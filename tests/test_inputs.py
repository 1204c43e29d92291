"""Every input is a DVC dependency: `mergeflow use` writes local model directories, calibration,
evaluation and test files into the download stages of dvc.yaml and pins hub branches, so editing
one input makes `dvc status` report exactly the stage that reads it, and nothing else.

The repositories here never run a stage: the download stages' outputs are put in place by the
library itself and recorded with `dvc commit`, so each check costs one `dvc status`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, copy_repo, make_tiny_llama, run
from test_sources import SHA, fill_hub_cache

from mergeflow.params import Params, load_params
from mergeflow.pipeline import ZOO_PARAMS, check_plugin, download_stages, eval_data_deps, out_of_sync
from mergeflow.zoo.sources import materialise

DOWNLOAD = ["download-base", "download", "download-eval"]


def write_inputs(folder: Path, experts: list[str]) -> dict:
    """Calibration and evaluation JSONL per expert and a test.csv, outside the repository."""
    folder.mkdir(parents=True, exist_ok=True)
    for e in experts:
        (folder / f"{e}.calib.jsonl").write_text("".join(json.dumps({"text": f"{i}+1={i + 1}"}) + "\n" for i in range(4)))
        (folder / f"{e}.eval.jsonl").write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    (folder / "test.csv").write_text("id,input,eval_type,answer_choices\n0,1+1=,generation,\n")
    return {"calib": {e: str(folder / f"{e}.calib.jsonl") for e in experts}, "eval": {e: str(folder / f"{e}.eval.jsonl") for e in experts},
            "test_csv": str(folder / "test.csv")}


def switch(repo: Path, env: dict, models: dict, data: dict) -> Params:
    """Point the repository's params at `models` and `data`, `mergeflow use params.yaml`, put the
    download stages' outputs in place and record them with `dvc commit` (no stage runs)."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["models"].update(models)
    params["data"] = data
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["mergeflow", "use", "params.yaml"], repo, env)
    assert "dvc.yaml: stage download-base: " in out and "dvc.yaml: stage download: " in out
    loaded = load_params(repo / "params.yaml")
    materialise(loaded, repo / "models", repo / "data")
    run(["dvc", "commit", "-f", *DOWNLOAD], repo, env)
    assert status(repo, env) == {}
    return loaded


def status(repo: Path, env: dict) -> dict:
    """What `dvc status --json` reports for the download stages (the rest never ran here)."""
    return json.loads(run(["dvc", "status", "--json", *DOWNLOAD], repo, env))


class edited:
    """Change a file for the duration of a `with` block (`change` gets its text), then restore it."""

    def __init__(self, path: Path, change):
        self.path, self.change = Path(path), change

    def __enter__(self):
        self.original = self.path.read_bytes()
        self.path.write_bytes(self.change(self.original))

    def __exit__(self, *exc):
        self.path.write_bytes(self.original)


@pytest.fixture(scope="module")
def local_repo(tmp_path_factory):
    """A repository copy with `models.source: local`: tiny models and data files outside it."""
    root = tmp_path_factory.mktemp("local")
    repo = root / "repo"
    env = copy_repo(repo, root / "site-cache")
    dirs = {name: str(make_tiny_llama(root / "checkpoints" / name, seed=7 + i)) for i, name in enumerate(("base", "math", "code"))}
    models = {"source": "local", "local": {"base": dirs["base"], "experts": {"math": dirs["math"], "code": dirs["code"]}}}
    switch(repo, env, models, write_inputs(root / "inputs", ["math", "code"]))
    return repo, env, root


def test_unchanged_inputs_change_nothing(local_repo):
    repo, env, _ = local_repo
    assert status(repo, env) == {}
    assert run(["mergeflow", "use", "params.yaml"], repo, env).startswith("params.yaml, dvc.yaml: unchanged")


def test_a_local_experts_weights_invalidate_only_that_expert(local_repo):
    repo, env, root = local_repo
    with edited(root / "checkpoints/math/model.safetensors", lambda b: b[:-4] + bytes(4)):
        changed = status(repo, env)
    # models/experts/math is a hard link to the source file, so it changed too (DVC's cache holds the recorded copy)
    assert set(changed) == {"download@math"} and changed["download@math"][0] == {"changed deps": {str(root / "checkpoints/math"): "modified"}}
    assert status(repo, env) == {}


def test_a_local_base_invalidates_only_the_base(local_repo):
    repo, env, root = local_repo
    with edited(root / "checkpoints/base/model.safetensors", lambda b: b[:-4] + bytes(4)):
        changed = status(repo, env)
    # models/base is a hard link to the source file, so it changed too, and with it the input of
    # the expert stages (which train from it or merge adapters into it); on a file system without
    # hard links only download-base is reported until it reruns
    assert changed == {
        "download-base": [{"changed deps": {str(root / "checkpoints/base"): "modified"}}, {"changed outs": {"models/base": "modified"}}],
        "download@math": [{"changed deps": {"models/base": "modified"}}],
        "download@code": [{"changed deps": {"models/base": "modified"}}],
    }


def test_a_calibration_file_invalidates_only_its_expert(local_repo):
    repo, env, root = local_repo
    calib = root / "inputs" / "code.calib.jsonl"
    with edited(calib, lambda b: b"".join(b.splitlines(keepends=True)[1:])):  # one line deleted
        assert status(repo, env) == {"download@code": [{"changed deps": {str(calib): "modified"}}]}


def test_evaluation_and_test_files_invalidate_only_download_eval(local_repo):
    repo, env, root = local_repo
    for name in ("math.eval.jsonl", "test.csv"):
        with edited(root / "inputs" / name, lambda b: b + b"\n"):
            assert status(repo, env) == {"download-eval": [{"changed deps": {str(root / "inputs" / name): "modified"}}]}


def test_a_local_input_missing_from_dvc_yaml_is_refused(local_repo, tmp_path):
    """`dvc exp run -S models.local.experts.math=...` changes params.yaml only: the stage refuses."""
    repo, env, _ = local_repo
    path = repo / "params.yaml"
    with edited(path, lambda b: b.replace(b"experts:\n      math: ", b"experts:\n      math: " + str(tmp_path).encode() + b"/")):
        assert b"experts:\n      math: " in path.read_bytes()
        proc = subprocess.run([sys.executable, "stages/download.py", "expert", "math"], cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "download.py: error: dvc.yaml: stage download is out of date for params.yaml (models.source 'local', experts ['math', 'code']): "
        "DVC would not watch every input; run `mergeflow use params.yaml` to regenerate it"
    )


@pytest.fixture(scope="module")
def hub_repo(tmp_path_factory, experts):
    """A repository copy with `models.source: hub` (revision main), offline on a pre-filled cache."""
    root = tmp_path_factory.mktemp("hub")
    repo = root / "repo"
    env = copy_repo(repo, root / "site-cache")
    cache = root / "hub-cache"
    for repo_id, src in [("org/base", experts[0]), ("org/math", experts[0]), ("org/code", experts[1])]:
        fill_hub_cache(cache, repo_id, src)
    env = {**env, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    hub = {"base": {"repo_id": "org/base", "revision": "main"}, "experts": {e: {"repo_id": f"org/{e}", "revision": "main"} for e in ("math", "code")}}
    import huggingface_hub.constants as c

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(c, "HF_HUB_CACHE", str(cache))
        mp.setattr(c, "HF_HUB_OFFLINE", True)
        params = switch(repo, env, {"source": "hub", "hub": hub}, write_inputs(root / "inputs", ["math", "code"]))
    return repo, env, params


def test_use_pins_hub_branches_to_their_commits(hub_repo):
    _, _, params = hub_repo
    assert params.models.hub.base.revision == SHA and {m.revision for m in params.models.hub.experts.values()} == {SHA}


def test_a_hub_revision_invalidates_only_that_expert(hub_repo):
    repo, env, _ = hub_repo
    with edited(repo / "params.yaml", lambda b: b.replace(b"repo_id: org/code\n        revision: " + SHA.encode(), b"repo_id: org/code\n        revision: v2")):
        assert status(repo, env) == {"download@code": [{"changed deps": {"params.yaml": {"models.hub.experts.code": "modified"}}}]}
    assert status(repo, env) == {}


def test_use_prints_the_pinned_revisions(tmp_path, monkeypatch, experts):
    import huggingface_hub.constants as c

    from mergeflow.recipes import use_recipe

    cache = tmp_path / "hub"
    fill_hub_cache(cache, "meta-llama/Llama-2-7b-hf", experts[0])
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    params_file = tmp_path / "params.yaml"
    _, changes = use_recipe(ROOT / "recipes" / "llm-merging-competition.yaml", params_file, None)
    assert f"{params_file}: models.hub.base.revision: main -> {SHA}" in changes
    assert any(line.startswith(f"{params_file}: models.hub.experts.gsm8k.revision stays 'main' (not in the Hugging Face cache") for line in changes)
    assert "    base: {repo_id: meta-llama/Llama-2-7b-hf, revision: " + SHA + "}\n" in params_file.read_text()  # layout kept


def test_zoo_stages_read_every_zoo_parameter():
    from mergeflow.params import SmolLM2Params, ToyZooParams

    for source, model in (("toy", ToyZooParams), ("smollm2", SmolLM2Params)):
        assert set().union(*ZOO_PARAMS[source].values()) == set(model.model_fields), source


def test_committed_dvc_yaml_matches_params():
    """What `mergeflow use params.yaml` would write is what is committed."""
    assert out_of_sync(ROOT / "dvc.yaml", load_params(ROOT / "params.yaml")) == []
    stages = download_stages(load_params(ROOT / "params.yaml"))
    assert stages["download"]["outs"][-1] == {"metrics/train/${item.expert}.csv": {"cache": False}}


def test_a_plugin_outside_the_plugin_folder_is_refused(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    check_plugin("methods/median.py:Median", tmp_path / "dvc.yaml")
    check_plugin("regmean", tmp_path / "dvc.yaml")
    with pytest.raises(ValueError) as err:
        check_plugin("my_methods/median.py:Median", tmp_path / "dvc.yaml")
    assert str(err.value) == (
        "params.yaml: method 'my_methods/median.py:Median': my_methods/median.py is not under methods/, the merge stage's plugin folder, "
        "so DVC would not rerun merge when it changes; move it there (method: methods/median.py:Median)"
    )


def test_an_eval_data_file_invalidates_only_the_evaluations(local_repo):
    """`eval.data_files` are local inputs of the evaluate stages: `mergeflow use` makes them deps,
    editing one reports exactly those stages, and a stage refuses a dvc.yaml that lacks them."""
    repo, env, root = local_repo
    data = root / "inputs" / "toy_math.test.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    with edited(repo / "params.yaml", lambda b: b.replace(b"data_files: {}", f"data_files: {{toy_math: {data}, not_run: {data}.x}}".encode())), \
            edited(repo / "dvc.yaml", lambda b: b), edited(repo / "dvc.lock", lambda b: b):
        proc = subprocess.run([sys.executable, "stages/evaluate.py", "--model", "models/base", "--out", "m.json", "--logs", "logs"],
                              cwd=repo, env=env, capture_output=True, text=True)
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines()[-1] == (
            "evaluate.py: error: dvc.yaml: stage evaluate-base's eval.data_files deps, stage evaluate-expert's eval.data_files deps, "
            "stage evaluate's eval.data_files deps are out of date for params.yaml (models.source 'local', experts ['math', 'code']): "
            "DVC would not watch every input; run `mergeflow use params.yaml` to regenerate them"
        )
        out = run(["mergeflow", "use", "params.yaml"], repo, env)
        assert f"dvc.yaml: stage evaluate-base: deps +{data}\n" in out and f"dvc.yaml: stage evaluate: deps +{data}\n" in out
        assert yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]["evaluate-base"]["deps"][-2:] == ["data/eval", str(data)]
        (repo / "logs/eval/base").mkdir(parents=True, exist_ok=True)  # stand-ins for the stage's outputs, recorded without running it
        (repo / "metrics/base.json").write_text("{}\n")
        run(["dvc", "commit", "-f", "evaluate-base"], repo, env)
        assert json.loads(run(["dvc", "status", "--json", "evaluate-base", *DOWNLOAD], repo, env)) == {}
        with edited(data, lambda b: b + b"\n"):
            assert json.loads(run(["dvc", "status", "--json", "evaluate-base", *DOWNLOAD], repo, env)) == {
                "evaluate-base": [{"changed deps": {str(data): "modified"}}]}
    run(["git", "checkout", "--", "metrics/base.json"], repo, env)


def test_eval_data_deps_are_the_run_tasks_local_files():
    params = load_params(ROOT / "params.yaml").model_copy(deep=True)
    evaluation = params.eval.model_copy(update={"tasks": ["xsum", "toy_math", "humaneval_instruct_fence", "gsm8k"],
                                                "data_files": {"gsm8k": {"test": "g/test.jsonl", "train": "g/train.jsonl"}, "mbpp": "not-run.jsonl"}})
    # xsum: its shipped default; toy_math: under data/eval (a dependency already); humaneval: inside a package
    assert eval_data_deps(params.model_copy(update={"eval": evaluation})) == ["data/validation/xsum.csv", "g/test.jsonl", "g/train.jsonl"]
