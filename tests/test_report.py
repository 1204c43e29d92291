"""`mergeflow report` on a synthetic `dvc exp show --json` document shaped like DVC 3.67's."""

from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

from mergeflow.cli import main
from mergeflow.report import collect, report, scores


def row(rev, name, alpha, method, merged, *, base=0.0, math=(0.5, 0.0), code=(0.0, 1.0)):
    """One row as `dvc exp show --json` writes it (params and metrics by file, each under `data`)."""
    metrics = {
        "metrics/base.json": {"toy_math": {"exact_match": base, "exact_match_stderr": 0.0}, "toy_code": {"exact_match": base, "exact_match_stderr": 0.0}},
        "metrics/experts/math.json": {"toy_math": {"exact_match": math[0]}, "toy_code": {"exact_match": math[1]}},
        "metrics/experts/code.json": {"toy_math": {"exact_match": code[0]}, "toy_code": {"exact_match": code[1]}},
        "metrics/merged.json": {"toy_math": {"exact_match": merged[0], "exact_match_stderr": 0.03}, "toy_code": {"exact_match": merged[1], "exact_match_stderr": 0.02}},
    }
    return {
        "rev": rev,
        "name": name,
        "data": {
            "rev": rev,
            "timestamp": "2025-01-01T00:00:00",
            "params": {"params.yaml": {"data": {"alpha": alpha, "method": method, "experts": ["math", "code"]}}},
            "metrics": {path: {"data": data} for path, data in metrics.items()},
            "deps": {},
            "outs": {},
            "meta": {"has_checkpoints": False},
        },
        "error": None,
        "experiments": None,
    }


def exp(rev, name, alpha, method, merged):
    return {"executor": {"state": "success", "name": "dvc-task", "local": None}, "name": name, "revs": [row(rev, name, alpha, method, merged)]}


@pytest.fixture
def doc():
    baseline = row("a" * 40, "main", 0.1, "regmean", (0.10, 0.0))
    baseline["experiments"] = [
        exp("b" * 40, "exp-one", 1.0, "regmean", (0.24, 0.25)),
        exp("c" * 40, "exp-zero", 0.0, "regmean", (0.02, 0.0)),
        exp("d" * 40, "exp-avg", 0.1, "average", (0.0, 0.01)),
        exp("e" * 40, "exp-half", 0.5, "regmean", (0.13, 0.12)),
        {"executor": {"state": "failed"}, "name": "exp-broken", "revs": [{"rev": "f" * 40, "name": "exp-broken", "data": {}, "error": {"type": "failed"}, "experiments": None}]},
    ]
    workspace = row("workspace", None, 0.3, "regmean", (0.9, 0.9))  # never plotted: it may be mid-run
    return [workspace, baseline]


def test_collect_points_and_references(doc):
    sweep = collect(doc)
    assert [(a, n) for a, n, _ in sweep.points] == [(0.0, "exp-zero"), (0.1, "main"), (0.5, "exp-half"), (1.0, "exp-one")]
    assert sweep.points[-1][2] == {"toy_math.exact_match": 0.24, "toy_code.exact_match": 0.25}
    assert sweep.metrics == ["toy_code.exact_match", "toy_math.exact_match"]
    assert list(sweep.references) == ["base", "expert-code", "expert-math", "average"]
    assert sweep.references["expert-math"] == {"toy_math.exact_match": 0.5, "toy_code.exact_match": 0.0}
    assert sweep.references["average"] == {"toy_math.exact_match": 0.0, "toy_code.exact_match": 0.01}


def test_scores_leave_out_standard_errors_filtered_or_not():
    metrics = {"chat_math": {"exact_match_last_number": 0.62, "exact_match_stderr_last_number": 0.05, "exact_match": 0.6, "exact_match_stderr": 0.04}}
    assert scores(metrics) == {"chat_math.exact_match_last_number": 0.62, "chat_math.exact_match": 0.6}


def test_report_writes_csv_and_png(doc, tmp_path):
    report(doc, tmp_path / "plots")
    with open(tmp_path / "plots/alpha_sweep.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["alpha"] for r in rows[:4]] == ["0.0", "0.1", "0.5", "1.0"]
    assert rows[3] == {"model": "regmean", "alpha": "1.0", "experiment": "exp-one", "toy_code.exact_match": "0.25", "toy_math.exact_match": "0.24"}
    assert [r["model"] for r in rows[4:]] == ["base", "expert-code", "expert-math", "average"]
    png = (tmp_path / "plots/alpha_sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_report_command_reads_a_saved_document(doc, tmp_path):
    (tmp_path / "exp.json").write_text(json.dumps(doc))
    result = CliRunner().invoke(main, ["report", "--exp-show", str(tmp_path / "exp.json"), "--out-dir", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert "   0.5                  0.1200                  0.1300" in result.output
    assert (tmp_path / "p/alpha_sweep.png").is_file()


def summary_row(rev, name, alpha, merged, *, math_expert=(0.5, 0.0)):
    """A row of a commit whose only metrics file is metrics/summary.json (base, expert-*, merged)."""
    r = row(rev, name, alpha, "regmean", merged)
    table = lambda m, c: {"toy_math": {"exact_match": m}, "toy_code": {"exact_match": c}}  # noqa: E731
    summary = {"base": table(0.0, 0.0), "expert-math": table(*math_expert), "expert-code": table(0.0, 1.0), "merged": table(*merged)}
    r["data"]["metrics"] = {"metrics/summary.json": {"data": summary}}
    return r


def test_summary_metrics_give_points_and_references_of_the_same_experiments():
    baseline = summary_row("a" * 40, "main", 0.1, (0.1, 0.0))
    baseline["experiments"] = [{"name": "exp-one", "revs": [summary_row("b" * 40, "exp-one", 1.0, (0.24, 0.25))]}]
    sweep = collect([baseline])
    assert [(a, n) for a, n, _ in sweep.points] == [(0.1, "main"), (1.0, "exp-one")]
    assert sweep.references == {"base": {"toy_math.exact_match": 0.0, "toy_code.exact_match": 0.0}, "expert-code": {"toy_math.exact_match": 0.0, "toy_code.exact_match": 1.0}, "expert-math": {"toy_math.exact_match": 0.5, "toy_code.exact_match": 0.0}}
    assert sweep.warnings == []
    assert sweep.selection() == "regmean: 2 alpha(s) from commit(s) main: 0.1 (main), 1 (exp-one)"


def test_references_that_differ_across_experiments_are_warned_about():
    """A sweep on a new zoo next to one on the committed zoo: the experts disagree, and the user is told which."""
    old = summary_row("a" * 40, "old", 0.1, (0.1, 0.0))
    new = summary_row("b" * 40, "new", 0.5, (0.2, 0.1), math_expert=(0.64, 0.0))
    sweep = collect([new, old])
    assert sweep.references["expert-math"] == {"toy_math.exact_match": 0.64, "toy_code.exact_match": 0.0}
    assert sweep.warnings == [
        "the expert-math differs across the selected experiments (new: toy_code.exact_match=0 toy_math.exact_match=0.64; "
        "old: toy_code.exact_match=0 toy_math.exact_match=0.5); drawing the first; select experiments of one zoo with --rev"
    ]
    assert sweep.baselines == ["new", "old"]


def test_a_single_point_says_how_to_select_earlier_experiments(tmp_path):
    """After a commit, `dvc exp show` lists only the new commit: the report says so, never silently one point."""
    (tmp_path / "exp.json").write_text(json.dumps([summary_row("a" * 40, "main", 0.1, (0.1, 0.0))]))
    result = CliRunner().invoke(main, ["report", "--exp-show", str(tmp_path / "exp.json"), "--out-dir", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert "selected regmean: 1 alpha(s) from commit(s) main: 0.1 (main)\n" in result.stderr
    assert "warning: one alpha only: experiments are listed under the commit they started from, so after a commit select the earlier ones with --rev <commit> or --all-commits\n" in result.stderr


def test_rev_and_a_saved_document_are_refused_together(doc, tmp_path):
    (tmp_path / "exp.json").write_text(json.dumps(doc))
    result = CliRunner().invoke(main, ["report", "--exp-show", str(tmp_path / "exp.json"), "--rev", "HEAD~1"])
    assert result.exit_code == 2 and "--rev and --all-commits select what `dvc exp show` reads" in result.output


def test_no_sweep_is_a_clear_error(doc):
    with pytest.raises(ValueError, match="no finished experiment with method=ties"):
        collect(doc, method="ties")


def test_reference_numbers_are_printed_beside_ours(doc, tmp_path):
    ref = tmp_path / "ref.csv"
    ref.write_text("model,metric,value\nexpert-math,toy_math.exact_match,0.7\nregmean alpha=0.1,toy_code.exact_match,0.45\naverage,gsm8k.exact_match,0.65\n")
    (tmp_path / "doc.json").write_text(json.dumps(doc))
    result = CliRunner().invoke(main, ["report", "--exp-show", str(tmp_path / "doc.json"), "--out-dir", str(tmp_path / "plots"), "--reference", str(ref)])
    assert result.exit_code == 0, result.output
    lines = [line.split() for line in result.output.splitlines()]
    assert ["expert-math", "toy_math.exact_match", "0.7000", "0.5000"] in lines
    assert ["regmean", "alpha=0.1", "toy_code.exact_match", "0.4500", "0.0000"] in lines
    assert ["average", "gsm8k.exact_match", "0.6500", "-"] in lines  # not measured here


def test_the_llama3_reference_table_is_readable():
    from pathlib import Path

    from mergeflow.report import read_reference

    table = read_reference(Path(__file__).resolve().parents[1] / "recipes" / "llama3-code-math.reference.csv")
    assert table["regmean alpha=0.1"]["gsm8k.exact_match_strict-match"] == 0.6831 and len(table) == 4


@pytest.mark.parametrize("recipe", ["llama3-code-math", "smollm2-cpu"])
def test_reference_tables_name_the_models_and_metrics_report_produces(recipe):
    """Every row of a recipe's reference table must be comparable: a model label that `report`
    gives (base, `<expert> expert`, average, `regmean alpha=<a>`) and one of the recipe's tasks."""
    import re
    from pathlib import Path

    import yaml

    from mergeflow.report import read_reference

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    params = yaml.safe_load((recipes / f"{recipe}.yaml").read_text())
    labels = {"base", "average", *(f"expert-{e}" for e in params["experts"])}
    table = read_reference(recipes / f"{recipe}.reference.csv")
    for model, metrics in table.items():
        assert model in labels or re.fullmatch(r"regmean alpha=\d+(\.\d+)?", model), model
        assert {m.split(".", 1)[0] for m in metrics} <= set(params["eval"]["tasks"]), (model, metrics)
        assert all(0.0 <= v <= 1.0 for v in metrics.values())


def test_a_per_layer_alpha_is_left_out_of_the_sweep_with_a_warning(doc):
    doc[1]["experiments"].append(exp("9" * 40, "tune-trial-3", [0.1, 0.9], "regmean", (0.3, 0.3)))
    sweep = collect(doc)
    assert [n for _, n, _ in sweep.points] == ["exp-zero", "main", "exp-half", "exp-one"]
    assert "tune-trial-3: alpha [0.1, 0.9] is per layer, not one number; left out of the sweep" in sweep.warnings
