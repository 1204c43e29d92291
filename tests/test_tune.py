"""`mergeflow tune` (issue 17): a search whose trials are DVC experiments.

The space checks run in-process on a params file (no DVC). The rest share one study on a clone of
the session's pipeline run (`tune_repo`): task arithmetic, merge.scaling gridded over three
choices of which one (1e9) makes the merge fail the magnitude check, toy_math as the validation
task and toy_code held out. The study runs in three commands: one trial (`--max-trials 1`), a
command SIGKILLed right after its trial's experiment finished (before recording it), and one that
resumes, finishes and promotes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import dvc_init_local, run, run_cli

from mergeflow.tune.space import parse_space, simplex_round

ROOT = Path(__file__).resolve().parents[1]
SCALINGS = [0.5, 1.0, 1.0e9]  # seed 0 grids them as 1e9 (fails), 1.0 (the killed command), 0.5


def params_with_space(tmp_path: Path, space: dict, **tune) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["tune"].update(space=space, **tune)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize(("space", "message"), [
    ({"merge.densty": [0.1, 0.9]}, "tune.space.merge.densty: unknown parameter 'merge.densty'; a space may set alpha, method, merge.convention, merge.density, merge.epsilon, merge.filter_wise, merge.fisher_floor, merge.gamma, merge.max_iter, merge.normalize, merge.nuslerp_flatten, merge.nuslerp_row_wise, merge.regmean_bias, merge.rescale, merge.scaling, merge.seed, merge.select_topk, merge.solver_dtype, merge.t, merge.tol, merge.use_base, merge.weights, merge.regmean_lm_head"),
    ({"alpha": [0.7, 0.7]}, "tune.space.alpha: empty range [0.7, 0.7]; give [low, high] with low < high"),
    ({"merge.weights": {"choices": [[0.5, 0.5], [0.8, 0.3]]}}, "tune.space.merge.weights: weights [0.8, 0.3] sum to 1.1, not 1; every choice must lie on the simplex"),
    ({"merge.weights": [0, 1]}, "tune.space.merge.weights: per-expert weights are `simplex` or {choices: [[w1, ..., w2], ...]} summing to 1, got [0, 1]"),
    ({"alpha": [0.0, 2.0]}, "tune.space.alpha: 2.0 is not a valid alpha: alpha must be in [0, 1], got 2.0"),
    ({"merge.weights": {"choices": [[0.5, 0.5, 0.0]]}}, "tune.space.merge.weights: [0.5, 0.5, 0.0] is not a valid merge.weights: merge.weights has 3 values for 2 experts; give one per expert, in the order of `experts`"),
    ({"merge.solver_dtype": {"low": 0, "high": 1, "gradient": 3}}, "tune.space.merge.solver_dtype: not a per-layer param (no method declares it so); remove `gradient`"),
    ({"merge.density": [0.0, 0.5]}, "tune.space.merge.density: 0.0 is not a valid merge.density: merge.density must be in (0, 1], got 0.0"),
])
def test_bad_spaces_are_refused_before_any_trial(tmp_path, capsys, monkeypatch, space, message):
    path = params_with_space(tmp_path, space)
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["tune", "--params", str(path)], capsys)
    assert (code, err) == (1, f"mergeflow: error: {path}: {message}\n")
    assert not (tmp_path / ".mergeflow").exists()  # no study, no trial


def test_held_out_task_must_not_select(tmp_path, capsys, monkeypatch):
    path = params_with_space(tmp_path, {"alpha": [0.0, 1.0]}, objective={"toy_math": "exact_match"}, held_out={"toy_math": "exact_match"})
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["tune", "--params", str(path)], capsys)
    assert (code, err) == (1, f"mergeflow: error: {path}: tune.held_out.toy_math: also a validation task in tune.objective; a held-out task must never select the trial\n")


class FixedTrial:
    """An Optuna-like trial answering every suggestion with `u` (the simplex's raw uniforms)."""

    def __init__(self, u: list[float]):
        self.u = iter(u)

    def suggest_float(self, name, low, high, log=False):
        return next(self.u)


def test_simplex_weights_sum_to_one_with_one_weight_per_expert():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["experts"] = ["math", "code", "list"]
    (dim,) = parse_space({"merge.weights": "simplex"}, raw, experts=3)
    weights = dim.suggest(FixedTrial([0.5, 0.25, 0.125]))
    # -log(u) normalised: ln2 : 2 ln2 : 3 ln2 = 1/6, 2/6, 3/6
    assert weights == [0.1667, 0.3333, 0.5] and sum(weights) == 1.0
    assert simplex_round([1 / 3, 1 / 3, 1 / 3]) == [0.3333, 0.3333, 0.3334]


def test_per_layer_entries_become_gradients_that_params_yaml_accepts(tmp_path):
    """`{low, high, gradient: 3}` is a 3-point list; `{simplex: true, gradient: 2}` one 2-point
    list per expert whose points each lie on the simplex; both written as `dvc exp run -S` writes
    them, into a params file that validates."""
    from mergeflow.params import load_params
    from mergeflow.tune.results import apply_values

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    alpha, weights = parse_space({"alpha": {"low": 0.0, "high": 1.0, "gradient": 3}, "merge.weights": {"simplex": True, "gradient": 2}}, raw, experts=2)
    assert alpha.suggest(FixedTrial([0.1, 0.55556, 0.9])) == [0.1, 0.5556, 0.9]
    # point 0: u = (0.5, 0.25) -> 1/3, 2/3; point 1: u = (0.25, 0.5) -> 2/3, 1/3
    assert weights.suggest(FixedTrial([0.5, 0.25, 0.25, 0.5])) == [[0.3333, 0.6667], [0.6667, 0.3333]]
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    items = apply_values(path, {"alpha": [0.1, 0.5556, 0.9], "merge.weights": [[0.3333, 0.6667], [0.6667, 0.3333]]})
    assert items == ["alpha=[0.1,0.5556,0.9]", "merge.weights=[[0.3333,0.6667],[0.6667,0.3333]]"]
    params = load_params(path)
    assert params.alpha == [0.1, 0.5556, 0.9] and params.merge.method_values()["weights"] == [[0.3333, 0.6667], [0.6667, 0.3333]]
    assert "# RegMean: scale of the grams' off-diagonals" in path.read_text()  # the file's comments stay


# --- one study, run through DVC ------------------------------------------------------------------

def tune_cmd(dest: Path, env: dict, *args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    extra = {"MERGEFLOW_FAULT": fault} if fault else {}
    return subprocess.run([sys.executable, "-m", "mergeflow", "tune", *args], cwd=dest, env={**env, **extra, "PYTHONPATH": str(ROOT / "src")},
                          capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def tune_repo(pipeline_run, tmp_path_factory):
    """A clone of the pipeline run (sharing its DVC cache) with a study `t` run in three commands."""
    src, env, _ = pipeline_run
    dest = tmp_path_factory.mktemp("tune-repo")
    run(["git", "clone", "-q", str(src), str(dest)], dest, env)
    run(["dvc", "cache", "dir", "--local", str(src / ".dvc" / "cache")], dest, env)
    dvc_init_local(dest, env, tmp_path_factory.mktemp("tune-site"))
    run(["dvc", "checkout"], dest, env)
    raw = yaml.safe_load((dest / "params.yaml").read_text())
    raw["method"] = "task_arithmetic"
    raw["tune"].update(study="t", space={"merge.scaling": {"choices": SCALINGS}}, objective={"toy_math": "exact_match"},
                       held_out={"toy_code": "exact_match"}, sampler="grid", trials=5)
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run(["git", "commit", "-qam", "tune t"], dest, env)
    first = tune_cmd(dest, env, "--max-trials", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    killed = tune_cmd(dest, env, fault="tune:experiment-done:kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = tune_cmd(dest, env)
    assert last.returncode == 0, last.stderr[-3000:]
    return dest, env, {"first": first, "killed": killed, "last": last}


def experiments(dest: Path, env: dict) -> dict[str, dict]:
    """name -> metrics/summary.json of every experiment of HEAD (`dvc exp show`'s own list)."""
    doc = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], cwd=dest, env=env, capture_output=True, text=True, check=True).stdout)
    found = {}
    for row in doc:
        for group in row.get("experiments") or []:
            for rev in group.get("revs") or []:
                found[rev["name"]] = rev["data"]["metrics"]["metrics/summary.json"]["data"]
    return found


def table(dest: Path) -> list[dict]:
    import csv

    with open(dest / "metrics/tune/t.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_killed_tune_resumes_without_repeating_finished_trials(tune_repo):
    dest, env, out = tune_repo
    assert "study t: 1/3 trials" in out["first"].stdout and "stopped by --max-trials 1" in out["first"].stdout
    # the killed command's trial finished its experiment, so the next command reads it back
    assert "recovered t-1 from its experiment" in out["last"].stderr
    assert "trial 1 " not in out["last"].stderr  # not run again: only trial 2 ran in the last command
    assert "trial 2 (merge.scaling=" in out["last"].stderr
    names = set(experiments(dest, env))
    trials = {n for n in names if not n.startswith("t-best-")}
    assert trials == {"t-1", "t-2"}  # one DVC experiment per successful trial, none run twice (t-0 failed: no experiment)
    assert [int(r["trial"]) for r in table(dest)] == [0, 1, 2]


def test_a_failing_trial_is_recorded_and_the_search_goes_on(tune_repo):
    dest, env, out = tune_repo
    rows = table(dest)
    assert sorted((float(r["merge.scaling"]), r["state"]) for r in rows) == [(0.5, "complete"), (1.0, "complete"), (1.0e9, "fail")]
    failed = next(r for r in rows if r["state"] == "fail")
    assert failed["objective"] == "" and failed["experiment"] == f"t-{failed['trial']}"
    said = out["first"].stderr + out["last"].stderr
    assert f"trial {failed['trial']} (merge.scaling=1000000000.0): failed: " in said and "> 1e+04" in said


def test_held_out_tasks_are_evaluated_only_for_the_promoted_trial(tune_repo):
    dest, env, out = tune_repo
    found = experiments(dest, env)
    promoted = [n for n in found if n.startswith("t-best-")]
    assert len(promoted) == 1
    for name, summary in found.items():
        tasks = set(summary["merged"])
        assert tasks == ({"toy_math", "toy_code"} if name in promoted else {"toy_math"}), name
    # the promoted trial is the best on the validation task alone
    complete = [r for r in table(dest) if r["state"] == "complete"]
    best = max(complete, key=lambda r: (float(r["objective"]), -int(r["trial"])))
    assert promoted == [f"t-best-{best['trial']}"]
    held = found[promoted[0]]["merged"]["toy_code"]["exact_match"]
    assert f"promoted: trial {best['trial']} (experiment t-best-{best['trial']}); held-out: toy_code {held:.4g}" in out["last"].stdout


def test_apply_reproduces_the_best_trial_byte_for_byte_with_dvc_repro(tune_repo):
    dest, env, out = tune_repo
    applied = tune_cmd(dest, env, "--apply")
    assert applied.returncode == 0, applied.stderr[-3000:]
    assert "params.yaml: merge.scaling=" in applied.stdout
    name = next(n for n in experiments(dest, env) if n.startswith("t-best-"))
    ref = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], dest, env).split()
    ref = next(r for r in ref if r.endswith("/" + name))
    lock = yaml.safe_load(run(["git", "show", f"{ref}:dvc.lock"], dest, env))
    assert yaml.safe_load((dest / "params.yaml").read_text())["merge"]["scaling"] == yaml.safe_load(run(["git", "show", f"{ref}:params.yaml"], dest, env))["merge"]["scaling"]
    run(["dvc", "repro", "--no-run-cache", "merge"], dest, env)  # recompute the merge, not restore it
    here = yaml.safe_load((dest / "dvc.lock").read_text())
    merged = lambda lk: next(o for o in lk["stages"]["merge"]["outs"] if o["path"] == "models/merged")  # noqa: E731
    assert merged(here)["md5"] == merged(lock)["md5"]
