"""The whole DVC pipeline on a reduced toy zoo, in a temporary copy of the repository.

Checks what a user relies on: `dvc repro` produces every output; a second `dvc repro` does nothing;
`dvc exp run -S alpha=0.3` and `-S method=ties` rerun merge, evaluate and submit only (and
`dvc metrics diff` reads the metrics); a gram parameter invalidates the grams and not the
download stages, an expert's toy parameter the expert stages only, a plugin method's file the
merge, an evaluation parameter only the evaluations, as `dvc status` reports them; switching to
a recipe and undoing it as the README says leaves nothing to rerun.
"""

from __future__ import annotations

import json
import subprocess

import pandas as pd
import pytest
import yaml
from helpers import ROOT, ran, run, skipped

pytestmark = pytest.mark.slow
AFTER_MERGE = {"merge", "evaluate", "submit"}
DOWNLOAD = {"download-base", "download@math", "download@code", "download-eval"}
FISHER = {"fisher@math", "fisher@code"}  # they read `method` (a marker for every method but fisher)
ALL_STAGES = {*DOWNLOAD, "gram@math", "gram@code", *FISHER, "merge", "evaluate-base", "evaluate-expert@math", "evaluate-expert@code", "evaluate", "summary", "submit"}
MAYBE = {"summary"}  # reruns only when a metrics file it reads changed (tiny models often score 0 either way)


@pytest.fixture(scope="module")
def repo(pipeline_run):
    """The committed pipeline run of a tiny toy zoo (conftest.py), shared with test_remotes.py."""
    dest, env, _ = pipeline_run
    return dest, env


@pytest.fixture(scope="module")
def first_repro(pipeline_run):
    return pipeline_run[2]


def test_repro_builds_every_output(repo, first_repro):
    dest, _ = repo
    assert ran(first_repro) == ALL_STAGES
    for model in ("base", "experts/math", "experts/code", "merged"):
        assert (dest / "models" / model / "model.safetensors").is_file(), model
    for expert in ("math", "code"):
        assert json.loads((dest / "models/grams" / expert / "grams.json").read_text())["num_tokens"] > 0
    for name in ("base", "experts/math", "experts/code", "merged"):
        metrics = json.loads((dest / "metrics" / f"{name}.json").read_text())
        assert set(metrics) == {"toy_math", "toy_code"} and all(0 <= m["exact_match"] <= 1 for m in metrics.values())
        assert sorted(p.name for p in (dest / "logs/eval" / name).iterdir()) == ["mergeflow_samples.json", "toy_code.jsonl", "toy_math.jsonl"]
        assert len((dest / "logs/eval" / name / "toy_math.jsonl").read_text().splitlines()) == 8
    for name in ("base", "math", "code"):  # the zoo's loss curves: one row per step (TINY_TOY: 10 steps each), in git
        curve = pd.read_csv(dest / "metrics/train" / f"{name}.csv")
        assert list(curve.columns) == ["step", "loss"] and curve["step"].tolist() == list(range(1, 11)) and (curve["loss"] > 0).all()
    assert "metrics/train/math.csv" in subprocess.run(["git", "ls-files", "metrics/train"], cwd=dest, capture_output=True, text=True).stdout
    summary = json.loads((dest / "metrics/summary.json").read_text())
    assert list(summary) == ["base", "expert-math", "expert-code", "merged"]
    assert summary["merged"]["toy_math"] == {"exact_match": json.loads((dest / "metrics/merged.json").read_text())["toy_math"]["exact_match"]}
    merge_config = json.loads((dest / "models/merged/mergeflow_merge.json").read_text())
    assert merge_config["method"] == "regmean" and merge_config["alpha"] == 0.1 and merge_config["solved_modules"] == 7
    test = pd.read_csv(dest / "data/test.csv")
    submission = pd.read_csv(dest / "submission.csv")
    assert len(test) == 8 and submission["id"].tolist() == test["id"].tolist()
    tracked = [f for f in subprocess.run(["git", "ls-files"], cwd=dest, capture_output=True, text=True).stdout.split() if not f.endswith(".gitignore")]
    assert not [f for f in tracked if f.startswith(("models/base", "models/experts", "models/merged", "models/grams/", "data/calib", "logs/")) or f == "submission.csv"]


def test_second_repro_is_up_to_date(repo, first_repro):
    dest, env = repo
    out = run(["dvc", "repro"], dest, env)
    assert ran(out) == set() and skipped(out) == ALL_STAGES
    assert "Data and pipelines are up to date." in run(["dvc", "status"], dest, env)


def test_recipe_switch_and_the_readme_undo(repo, first_repro):
    """`mergeflow use` another recipe rewrites params.yaml and dvc.yaml (printing what it changed);
    the README's undo, `git checkout params.yaml dvc.yaml`, leaves nothing to rerun."""
    dest, env = repo
    out = run(["mergeflow", "use", "recipes/smollm2-cpu.yaml"], dest, env)
    assert "params.yaml: models: source, " in out and "dvc.yaml: stage merge: deps +models/experts/list +models/grams/list +models/fisher/list +data/calib/list.jsonl -models/experts/code -models/grams/code -models/fisher/code -data/calib/code.jsonl" in out
    assert {"download-base", "download@list", "gram@list", "fisher@list", "merge"} <= set(json.loads(run(["dvc", "status", "--json"], dest, env)))
    run(["git", "checkout", "params.yaml", "dvc.yaml"], dest, env)
    assert "Data and pipelines are up to date." in run(["dvc", "status"], dest, env)
    assert ran(run(["dvc", "repro"], dest, env)) == set()


def test_alpha_experiment_reruns_only_merge_and_after(repo, first_repro):
    dest, env = repo
    out = run(["dvc", "exp", "run", "-S", "alpha=0.3"], dest, env)
    assert ran(out) - MAYBE == AFTER_MERGE
    assert skipped(out) | MAYBE == ALL_STAGES - AFTER_MERGE
    assert json.loads((dest / "models/merged/mergeflow_merge.json").read_text())["alpha"] == 0.3
    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], dest, env) or "{}")
    assert set(diff) <= {"metrics/merged.json", "metrics/summary.json"}  # only the merged model's metrics can change
    shown = json.loads(run(["dvc", "exp", "show", "--json"], dest, env))
    assert any("params.yaml" in json.dumps(e) for e in shown)


def test_method_experiment_reruns_only_merge_and_after(repo, first_repro):
    # ties needs the base (average, which does not, runs in test_competition_recipe.py)
    dest, env = repo
    out = run(["dvc", "exp", "run", "-S", "method=ties"], dest, env)
    assert ran(out) - MAYBE == AFTER_MERGE | FISHER  # fisher@<expert> rewrites its marker, in well under a second
    config = json.loads((dest / "models/merged/mergeflow_merge.json").read_text())
    assert config["method"] == "ties" and config["base"] == "models/base"


def test_data_aware_methods_run_in_the_pipeline(repo, first_repro):
    """`-S method=fisher` turns the fisher@<expert> markers into Fisher directories and merges with
    them; `-S method=regmean_pp` merges from the calibration files, layer by layer."""
    dest, env = repo
    assert json.loads((dest / "models/fisher/math/fisher.json").read_text())["skipped"].endswith("reads no Fisher")
    out = run(["dvc", "exp", "run", "-S", "method=fisher"], dest, env)
    assert ran(out) - MAYBE == AFTER_MERGE | FISHER
    fisher = json.loads((dest / "models/fisher/math/fisher.json").read_text())
    assert fisher["estimator"] == "empirical" and fisher["num_examples"] > 0 and "model.embed_tokens.weight" in fisher["tensors"]
    config = json.loads((dest / "models/merged/mergeflow_merge.json").read_text())
    assert config["method"] == "fisher" and config["fisher"] == ["models/fisher/math", "models/fisher/code"] and config["fisher_floor"] == 1e-6
    out = run(["dvc", "exp", "run", "-S", "method=regmean_pp"], dest, env)
    assert ran(out) - MAYBE == AFTER_MERGE | FISHER  # markers again, saying regmean_pp
    config = json.loads((dest / "models/merged/mergeflow_merge.json").read_text())
    assert config["method"] == "regmean_pp" and config["calibration"] == ["data/calib/math.jsonl", "data/calib/code.jsonl"]


def status_after_setting(repo, key: str, value) -> dict:
    """`dvc status --json` (the stages `dvc repro` would start from) with one parameter changed in
    params.yaml, which is restored afterwards."""
    dest, env = repo
    path = dest / "params.yaml"
    original = path.read_text()
    assert json.loads(run(["dvc", "status", "--json"], dest, env)) == {}
    params = yaml.safe_load(original)
    *groups, name = key.split(".")
    node = params
    for group in groups:
        node = node[group]
    node[name] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        return json.loads(run(["dvc", "status", "--json"], dest, env))
    finally:
        path.write_text(original)


def test_plugin_method_file_invalidates_merge(repo, first_repro):
    """The merge stage depends on the plugin folder methods/, so `dvc exp run -S
    method=methods/median.py:Median` reruns merge whenever that file is edited."""
    dest, env = repo
    plugin = dest / "methods" / "median.py"
    original = plugin.read_text()
    assert json.loads(run(["dvc", "status", "--json"], dest, env)) == {}
    plugin.write_text(original.replace(".median(dim=0).values", ".mean(dim=0)"))
    try:
        assert json.loads(run(["dvc", "status", "--json"], dest, env)) == {"merge": [{"changed deps": {"methods": "modified"}}]}
    finally:
        plugin.write_text(original)


def test_toy_expert_parameter_invalidates_the_experts_not_the_base(repo, first_repro):
    status = status_after_setting(repo, "models.toy.expert_lr", 0.001)
    assert status == {f"download@{e}": [{"changed deps": {"params.yaml": {"models.toy.expert_lr": "modified"}}}] for e in ("math", "code")}


def test_gram_parameter_invalidates_grams_not_download(repo, first_repro):
    status = status_after_setting(repo, "gram.max_length", 8)
    # and what follows them; download and the reference evaluations stay (merge and fisher@<expert>
    # read the calibration keys of `gram` themselves)
    assert set(status) == {"gram@math", "gram@code", *FISHER, "merge"}
    assert status["gram@math"] == [{"changed deps": {"params.yaml": {"gram.max_length": "modified"}}}]


@pytest.mark.parametrize(("key", "value"), [("gram.checkpoint_every", 1), ("gram.max_gram_memory", "6KB")])
def test_keys_that_do_not_change_outputs_rerun_nothing(repo, first_repro, key, value):
    """params.RUN_ONLY: how a stage runs, not what it writes (the same grams: test_grams_scale.py)."""
    assert status_after_setting(repo, key, value) == {}


def test_eval_parameter_invalidates_only_evaluation(repo, first_repro):
    status = status_after_setting(repo, "eval.limit", 4)
    assert set(status) == {"evaluate-base", "evaluate-expert@math", "evaluate-expert@code", "evaluate"}


# --- exploring experiments: dvc exp show, dvc plots, mergeflow report, the way back --------------

README = (ROOT / "README.md").read_text()
# README, "Sweeps": the commands tested below, exactly as written there.
EXP_SHOW_80 = r"dvc exp show --drop '.*' --keep '^(Experiment|alpha|method|merged\.toy_math\..*)$'"
EXP_SHOW_CHANGED = "dvc exp show --only-changed --drop 'Created|.*/'"
PLOTS_DIFF = "dvc plots diff HEAD $(dvc exp ls --name-only)"
WAY_BACK = "git checkout -- params.yaml dvc.lock metrics/ && dvc checkout"


def find_experiment(repo, params: dict) -> str | None:
    """The name of an experiment of the workspace's commit with these params, per `dvc exp show`."""
    dest, env = repo
    for row in json.loads(run(["dvc", "exp", "show", "--json"], dest, env)):
        for group in row.get("experiments") or []:
            for rev in group["revs"]:
                values = rev["data"]["params"]["params.yaml"]["data"]
                if all(values.get(k) == v for k, v in params.items()):
                    return rev["name"]
    return None


def experiment(repo, **params) -> str:
    """The experiment with these params (from the tests above), run if there is none yet."""
    if (name := find_experiment(repo, params)) is None:
        dest, env = repo
        run(["dvc", "exp", "run", *(f"-S{k}={v}" for k, v in params.items())], dest, env)
        name = find_experiment(repo, params)
        assert name, f"dvc exp run {params} left no such experiment"
    return name


def bash(command: str, repo, extra_env: dict | None = None) -> str:
    dest, env = repo
    proc = subprocess.run(["bash", "-ec", command], cwd=dest, env={**env, **(extra_env or {})}, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{command}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_exp_show_records_each_metric_once_without_standard_errors(repo, first_repro):
    dest, env = repo
    experiment(repo, alpha=0.3, method="regmean")
    rows = json.loads(run(["dvc", "exp", "show", "--json"], dest, env))
    revs = [r for row in rows for r in [row, *(rev for g in row.get("experiments") or [] for rev in g["revs"])]]
    assert len(revs) >= 3
    for rev in revs:
        metrics = rev["data"]["metrics"]
        assert list(metrics) == ["metrics/summary.json"], rev["rev"]
        names = [f"{model}.{task}.{m}" for model, tasks in metrics["metrics/summary.json"]["data"].items() for task, ms in tasks.items() for m in ms]
        assert sorted(names) == sorted(f"{model}.{task}.exact_match" for model in ("base", "expert-math", "expert-code", "merged") for task in ("toy_math", "toy_code"))


def test_readme_exp_show_fits_80_columns(repo, first_repro):
    """The README's views of the experiments: one task's merged score with the sweep's params on
    80 columns (no column collapsed to '…'), and what the experiments changed without hashes."""
    experiment(repo, alpha=0.3, method="regmean")
    experiment(repo, method="ties")
    assert EXP_SHOW_80 in README and EXP_SHOW_CHANGED in README
    out = bash(f"{EXP_SHOW_80} --no-pager", repo, {"COLUMNS": "80"})
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in out, out
    assert lines[1].split() == ["Experiment", "merged.toy_math.exact_match", "alpha", "method"], out
    assert {"0.1", "0.3"} <= {line.split()[-2] for line in lines[3:-1]}, out
    changed = bash(f"{EXP_SHOW_CHANGED} --csv", repo).splitlines()[0].split(",")
    assert {"alpha", "method"} <= set(changed), changed  # the params the experiments changed ...
    assert not [c for c in changed if c.startswith(("base.", "expert-", "models.", "gram.", "eval.")) or "/" in c], changed  # ... and nothing constant or hashed


def vega_specs(html: str) -> dict[str, dict]:
    """plot id -> the vega-lite spec that `dvc plots diff -o` embedded in its index.html."""
    import re

    return {m[0]: json.loads(m[1]) for m in re.findall(r'<div id = "([^"]+)">\s*<script type = "text/javascript">\s*var spec = (\{.*?\});\s*vegaEmbed', html, re.DOTALL)}


def test_plots_diff_draws_the_alpha_sweep_and_the_scores(repo, first_repro):
    """Three alphas (the commit's 0.1 and two experiments): the HTML that `dvc plots diff` writes
    holds every revision's merged scores against alpha, and every model's scores."""
    dest, env = repo
    names = {experiment(repo, alpha=a, method="regmean") for a in (0.3, 1.0)}
    assert PLOTS_DIFF in README
    bash(PLOTS_DIFF, repo)
    specs = vega_specs((dest / "dvc_plots/index.html").read_text())
    assert {"alpha-sweep", "scores"} <= set(specs)
    sweep = specs["alpha-sweep"]
    assert sweep["encoding"]["x"]["field"] == "alpha" and sweep["encoding"]["y"]["field"] == "score" and sweep["encoding"]["color"]["field"] == "metric"
    points = {(p["rev"], p["method"], float(p["alpha"]), p["metric"]) for p in sweep["data"]["values"]}
    regmean = {(rev, alpha) for rev, method, alpha, _ in points if method == "regmean"}
    assert {("HEAD", 0.1)} | {(n, a) for n, a in regmean if n in names} == regmean and {a for _, a in regmean} == {0.1, 0.3, 1.0}
    assert {m for *_, m in points} == {"toy_math.exact_match", "toy_code.exact_match"}
    committed = json.loads(run(["git", "show", "HEAD:metrics/summary.json"], dest, env))
    scores = {(s["model"], s["metric"]): float(s["score"]) for s in specs["scores"]["data"]["values"] if s["rev"] == "HEAD"}
    assert scores == {(model, f"{task}.{m}"): v for model, tasks in committed.items() for task, ms in tasks.items() for m, v in ms.items()}
    assert {s["rev"] for s in specs["scores"]["data"]["values"]} >= {"HEAD", *names}


def test_report_selects_experiments_and_their_own_references(repo, first_repro, tmp_path):
    dest, env = repo
    experiment(repo, alpha=0.3, method="regmean")
    out = run(["mergeflow", "report", "--repo", str(dest), "--rev", "HEAD", "--out-dir", str(tmp_path)], dest, env)
    assert "selected regmean: " in out and " alpha(s) from commit(s) " in out and "0.1 (" in out and "0.3 (" in out
    assert "warning:" not in out  # one zoo: base and experts agree across the experiments
    rows = pd.read_csv(tmp_path / "alpha_sweep.csv")
    summary = json.loads(run(["git", "show", "HEAD:metrics/summary.json"], dest, env))
    math_expert = rows[rows["model"] == "expert-math"].iloc[0]
    assert math_expert["toy_math.exact_match"] == summary["expert-math"]["toy_math"]["exact_match"]


def test_the_way_back_to_the_committed_state(repo, first_repro):
    """`dvc exp apply` brings an experiment into the workspace, `dvc exp branch` keeps it, and the
    README's way back restores the committed params, metrics and outputs from DVC's cache."""
    dest, env = repo
    name = experiment(repo, alpha=0.3, method="regmean")
    run(["dvc", "exp", "apply", name], dest, env)
    assert json.loads((dest / "models/merged/mergeflow_merge.json").read_text())["alpha"] == 0.3
    run(["dvc", "exp", "branch", name, "alpha-0.3"], dest, env)
    assert yaml.safe_load(run(["git", "show", "alpha-0.3:params.yaml"], dest, env))["alpha"] == 0.3
    assert WAY_BACK in README
    bash(WAY_BACK, repo)
    assert run(["git", "status", "--porcelain", "--untracked-files=no"], dest, env) == ""
    assert "Data and pipelines are up to date." in run(["dvc", "status"], dest, env)
    config = json.loads((dest / "models/merged/mergeflow_merge.json").read_text())
    assert config["alpha"] == 0.1 and config["method"] == "regmean"
