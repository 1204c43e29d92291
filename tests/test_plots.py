"""The tables `dvc plots` draws (mergeflow.plots, written by the `summary` stage) and dvc.yaml's
`plots:` and metrics definitions; `dvc plots diff` itself runs in test_pipeline.py."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml
from helpers import ROOT

from mergeflow.plots import SCORES_HEADER, SWEEP_HEADER, score_rows, sweep_rows, write_csv

SUMMARY = {
    "base": {"toy_math": {"exact_match": 0.0}, "xsum": {"rouge1": 0.25, "rouge2": 0.125}},
    "expert-math": {"toy_math": {"exact_match": 0.5}, "xsum": {"rouge1": 0.0, "rouge2": 0.0}},
    "merged": {"toy_math": {"exact_match": 0.1}, "xsum": {"rouge1": 0.5, "rouge2": 0.25}},
}


def test_long_tables_of_scores_and_of_the_sweep_point(tmp_path):
    write_csv(tmp_path / "scores.csv", SCORES_HEADER, score_rows(SUMMARY))
    write_csv(tmp_path / "sweep.csv", SWEEP_HEADER, sweep_rows(SUMMARY["merged"], "regmean", 0.3))
    assert (tmp_path / "scores.csv").read_text().splitlines() == [
        "model,metric,score",
        "base,toy_math.exact_match,0.0", "base,xsum.rouge1,0.25", "base,xsum.rouge2,0.125",
        "expert-math,toy_math.exact_match,0.5", "expert-math,xsum.rouge1,0.0", "expert-math,xsum.rouge2,0.0",
        "merged,toy_math.exact_match,0.1", "merged,xsum.rouge1,0.5", "merged,xsum.rouge2,0.25",
    ]
    assert (tmp_path / "sweep.csv").read_text() == "method,alpha,metric,score\nregmean,0.3,toy_math.exact_match,0.1\nregmean,0.3,xsum.rouge1,0.5\nregmean,0.3,xsum.rouge2,0.25\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.csv", "sweep.csv"]  # no temporary left


def test_summary_stage_writes_the_metrics_and_both_tables(tmp_path):
    metrics = tmp_path / "metrics"
    (metrics / "experts").mkdir(parents=True)
    for name, path in [("base", metrics / "base.json"), ("expert-math", metrics / "experts/math.json"), ("merged", metrics / "merged.json")]:
        table = {task: {**values, **{f"{m}_stderr": 0.01 for m in values}} for task, values in SUMMARY[name].items()}
        path.write_text(json.dumps(table))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.update(alpha=0.5, method="regmean", experts=["math"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, str(ROOT / "stages/summary.py"), "--params", "params.yaml", "--metrics", "metrics", "--out", "metrics/summary.json",
                           "--scores", "metrics/scores.csv", "--sweep", "metrics/sweep.csv"], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((metrics / "summary.json").read_text()) == SUMMARY  # standard errors left out
    assert (metrics / "sweep.csv").read_text().splitlines()[1] == "regmean,0.5,toy_math.exact_match,0.1"
    assert len((metrics / "scores.csv").read_text().splitlines()) == 1 + 9


def test_summary_is_the_only_metrics_file():
    """Each score once in `dvc exp show`: the per-model files (with standard errors) are plain outputs."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert {name: s["metrics"] for name, s in stages.items() if "metrics" in s} == {"summary": [{"metrics/summary.json": {"cache": False}}]}
    for name, path in [("evaluate-base", "metrics/base.json"), ("evaluate-expert", "metrics/experts/${item.expert}.json"), ("evaluate", "metrics/merged.json")]:
        assert {path: {"cache": False}} in stages[name]["outs"], name


def test_plots_read_the_tables_and_every_loss_file():
    """dvc.yaml's top-level plots: the templates exist in .dvc/plots, and the loss plots are the
    folder metrics/train, one plot per file, whatever `experts` lists."""
    plots = {k: v for entry in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"] for k, v in entry.items()}
    assert plots["alpha-sweep"]["y"] == {"metrics/sweep.csv": "score"} and plots["alpha-sweep"]["x"] == "alpha"
    assert plots["scores"]["y"] == {"metrics/scores.csv": "model"} and plots["scores"]["x"] == "score"
    assert plots["metrics/train"] == {"template": "linear", "x": "step", "y": "loss"}
    for name in ("sweep", "scores"):
        template = json.loads((ROOT / ".dvc/plots" / f"{name}.json").read_text())
        assert template["data"] == {"values": "<DVC_METRIC_DATA>"}
        assert plots["alpha-sweep" if name == "sweep" else "scores"]["template"] == name
