"""`mergeflow report`: an alpha sweep's experiments as a CSV table and a plot.

Reads `dvc exp show --json` (a list of rows: the workspace, then each baseline commit with its
`experiments`, groups whose `revs` are the experiments; each row's `data` holds `params` and
`metrics` by file) for the experiments selected as `dvc exp show` selects them: the current
commit's by default, `--rev <commit>` (repeatable) or `--all-commits`. The merged model's metrics
of every finished experiment of the swept method become one point per alpha; the base model and
each expert of those same experiments (and the `average` merge, where one ran it) become
horizontal reference lines, with a warning when the experiments disagree about them (another zoo
or other evaluation settings). The metrics are `metrics/summary.json` (`{model: {task: {metric:
value}}}` with models `base`, `expert-<name>`, `merged`), or the per-model files that commits
made before it was the only metrics file recorded (`metrics/merged.json`, `metrics/base.json`,
`metrics/experts/<name>.json`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_file
from .evaluation.harness import expert_label, is_stderr
from .plots import metric_rows

log = logging.getLogger(__name__)
SUMMARY = "metrics/summary.json"
MERGED = "metrics/merged.json"
BASE = "metrics/base.json"
EXPERTS = "metrics/experts/"


@dataclass
class Run:
    """One experiment (or commit) of `dvc exp show`: its name, params, metrics by file, and the
    commit it is based on (its own rev for a commit)."""

    name: str
    rev: str
    params: dict[str, Any]
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    baseline: str = ""

    def models(self) -> dict[str, dict[str, float]]:
        """Scores by model label: `merged`, `base`, `expert-<name>` (as metrics/summary.json names them)."""
        found: dict[str, dict[str, float]] = {}
        summary = self.metrics.get(SUMMARY) or {}
        for model, table in summary.items():
            if isinstance(table, dict):
                found[model] = scores(table)
        if MERGED in self.metrics:
            found.setdefault("merged", scores(self.metrics[MERGED]))
        if BASE in self.metrics:
            found.setdefault("base", scores(self.metrics[BASE]))
        for path, metrics in self.metrics.items():
            if path.startswith(EXPERTS) and path.endswith(".json"):
                found.setdefault(expert_label(Path(path).stem), scores(metrics))
        return {label: s for label, s in found.items() if s}


def exp_show(repo: str | Path = ".", revs: Sequence[str] = (), all_commits: bool = False) -> list[dict]:
    """Run `dvc exp show --json` in `repo` (for `revs`, or every commit) and parse it."""
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    cmd = [dvc, "exp", "show", "--json"]
    if all_commits:
        cmd.append("--all-commits")
    for rev in revs:
        cmd += ["--rev", rev]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise OSError(f"`{' '.join(cmd[1:])}` failed in {repo}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return json.loads(proc.stdout)


def _run(row: dict, baseline: str) -> Run | None:
    data = row.get("data") or {}
    if row.get("error") or not data:
        return None
    params = (data.get("params") or {}).get("params.yaml", {}).get("data") or {}
    metrics = {path: (m or {}).get("data") or {} for path, m in (data.get("metrics") or {}).items()}
    rev = str(row.get("rev", ""))
    return Run(name=row.get("name") or rev[:7], rev=rev, params=params, metrics=metrics, baseline=baseline)


def runs(doc: list[dict]) -> Iterator[Run]:
    """Every finished commit and experiment in a `dvc exp show --json` document (not the workspace)."""
    for row in doc:
        baseline = row.get("name") or str(row.get("rev", ""))[:7]
        if row.get("rev") != "workspace" and (run := _run(row, baseline)) is not None:
            yield run
        for group in row.get("experiments") or []:
            for rev in group.get("revs") or []:
                if (run := _run(rev, baseline)) is not None:
                    yield run


def scores(metrics: dict[str, Any]) -> dict[str, float]:
    """`{task: {metric: v}}` -> `{"task.metric": v}` (as `dvc plots` reads it), standard errors left out."""
    return {name: v for name, v in metric_rows(metrics) if not is_stderr(name)}


@dataclass
class Sweep:
    method: str
    points: list[tuple[float, str, dict[str, float]]]  # (alpha, experiment, scores), by alpha
    references: dict[str, dict[str, float]]           # label -> scores
    baselines: list[str] = field(default_factory=list)  # the commits the points are based on
    warnings: list[str] = field(default_factory=list)   # what the caller should tell the user

    @property
    def metrics(self) -> list[str]:
        names = {m for _, _, s in self.points for m in s}
        return sorted(names)

    def selection(self) -> str:
        """One line saying what was selected, for the user to check."""
        alphas = ", ".join(f"{a:g} ({n})" for a, n, _ in self.points)
        return f"{self.method}: {len(self.points)} alpha(s) from commit(s) {', '.join(self.baselines)}: {alphas}"


def _fmt(s: dict[str, float]) -> str:
    return " ".join(f"{m}={v:g}" for m, v in sorted(s.items()))


def _references(sources: list[tuple[str, dict[str, dict[str, float]]]]) -> tuple[dict[str, dict[str, float]], list[str]]:
    """One score table per reference model from the experiments that gave points, and a warning
    for each model whose scores differ between them (the first experiment's are kept)."""
    seen: dict[str, list[tuple[dict[str, float], list[str]]]] = {}
    for name, models in sources:
        for label, s in models.items():
            if label == "merged":
                continue
            variants = seen.setdefault(label, [])
            for known, names in variants:
                if known == s:
                    names.append(name)
                    break
            else:
                variants.append((s, [name]))
    warnings = []
    for label, variants in seen.items():
        if len(variants) > 1:
            detail = "; ".join(f"{', '.join(names)}: {_fmt(s)}" for s, names in variants)
            warnings.append(f"the {label} differs across the selected experiments ({detail}); drawing the first; select experiments of one zoo with --rev")
    return {label: variants[0][0] for label, variants in seen.items()}, warnings


def collect(doc: list[dict], method: str = "regmean") -> Sweep:
    """The sweep over alpha of `method` and its reference models, from `dvc exp show --json`."""
    by_alpha: dict[float, tuple[str, dict[str, float]]] = {}
    sources: list[tuple[str, dict[str, dict[str, float]]]] = []
    average: dict[str, float] = {}
    baselines: list[str] = []
    warnings: list[str] = []
    for run in runs(doc):
        models = run.models()
        merged = models.get("merged", {})
        if run.params.get("method") == method and merged and "alpha" in run.params:
            alpha = run.params["alpha"]
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):  # a per-layer alpha (a tune trial): no point on the axis
                warnings.append(f"{run.name}: alpha {alpha!r} is per layer, not one number; left out of the sweep")
                continue
            alpha = float(alpha)
            if alpha in by_alpha:
                if by_alpha[alpha][1] != merged:
                    warnings.append(f"alpha={alpha:g}: {by_alpha[alpha][0]} and {run.name} differ (other params changed?); keeping {by_alpha[alpha][0]}")
                continue
            by_alpha[alpha] = (run.name, merged)
        elif run.params.get("method") == "average" and merged:
            average = average or merged
        else:
            continue
        sources.append((run.name, models))
        if run.baseline not in baselines:
            baselines.append(run.baseline)
    if not by_alpha:
        raise ValueError(f"no finished experiment with method={method} and {SUMMARY} among the selected ones; run e.g. dvc exp run --queue -S alpha=0.0,0.1,0.5 then dvc queue start, or select others with --rev / --all-commits")
    references, differ = _references(sources)
    warnings += differ
    if average:
        references["average"] = average
    if len(by_alpha) == 1:
        warnings.append("one alpha only: experiments are listed under the commit they started from, so after a commit select the earlier ones with --rev <commit> or --all-commits")
    points = [(alpha, name, s) for alpha, (name, s) in sorted(by_alpha.items())]
    order = ["base"] + sorted(k for k in references if k.startswith(expert_label(""))) + (["average"] if "average" in references else [])
    return Sweep(method=method, points=points, references={k: references[k] for k in order if k in references}, baselines=baselines, warnings=warnings)


def write_csv(sweep: Sweep, path: str | Path) -> None:
    """One row per alpha (model = the method) and one per reference model (alpha empty)."""
    import csv

    metrics = sweep.metrics
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["model", "alpha", "experiment", *metrics])
        for alpha, name, s in sweep.points:
            writer.writerow([sweep.method, alpha, name, *(s.get(m, "") for m in metrics)])
        for label, s in sweep.references.items():
            writer.writerow([label, "", "", *(s.get(m, "") for m in metrics)])


def plot(sweep: Sweep, path: str | Path) -> None:
    """One panel per metric: the method's score against alpha, reference models as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sweep.metrics
    cols = min(2, len(metrics))
    rows = (len(metrics) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.4 * rows), squeeze=False)
    styles = {"base": ("0.55", ":"), "average": ("black", "--")}
    palette = iter(["tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"])
    colours = {label: styles.get(label, (None, "-."))[0] or next(palette) for label in sweep.references}
    alphas = [a for a, _, _ in sweep.points]
    for ax, metric in zip(axes.flat, metrics):
        xs = [a for a, _, s in sweep.points if metric in s]
        ys = [s[metric] for _, _, s in sweep.points if metric in s]
        ax.plot(xs, ys, marker="o", linewidth=2, color="tab:blue", label=f"{sweep.method} (merged)", zorder=3)
        for label, s in sweep.references.items():
            if metric in s:
                ax.axhline(s[metric], color=colours[label], linestyle=styles.get(label, (None, "-."))[1], linewidth=1.5, label=f"{label}: {s[metric]:.3g}")
        task, _, name = metric.partition(".")
        ax.set_title(f"{task}: {name}")
        ax.set_xlabel("alpha (scale of the grams' off-diagonals)")
        ax.set_ylabel(name)
        ax.set_xticks(alphas)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle(f"{sweep.method}: merged model's scores against alpha ({len(alphas)} experiments)")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def read_reference(path: str | Path) -> dict[str, dict[str, float]]:
    """Published numbers kept beside a recipe: a CSV of `model,metric,value` rows, where model is
    a label of ours (`expert-math`, `average`, `regmean alpha=0.1`) and metric `task.metric`."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: reference table not found (--reference)")
    table: dict[str, dict[str, float]] = {}
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"model", "metric", "value"} <= set(rows[0]):
        raise ValueError(f"{path}: expected columns model,metric,value")
    for r in rows:
        table.setdefault(r["model"], {})[r["metric"]] = float(r["value"])
    return table


def compare(sweep: Sweep, reference: dict[str, dict[str, float]]) -> list[tuple[str, str, float, float | None]]:
    """(model, metric, theirs, ours) for every reference number; ours is None where not measured."""
    ours = dict(sweep.references)
    ours.update({f"{sweep.method} alpha={alpha:g}": s for alpha, _, s in sweep.points})
    return [(model, metric, value, ours.get(model, {}).get(metric)) for model, metrics in reference.items() for metric, value in metrics.items()]


def report(doc: list[dict], out_dir: str | Path = "plots", method: str = "regmean") -> Sweep:
    """Write `<out_dir>/alpha_sweep.csv` and `<out_dir>/alpha_sweep.png`; return the sweep."""
    sweep = collect(doc, method)
    out_dir = Path(out_dir)
    write_csv(sweep, out_dir / "alpha_sweep.csv")
    plot(sweep, out_dir / "alpha_sweep.png")
    log.info("wrote %s and %s (%d alphas)", out_dir / "alpha_sweep.csv", out_dir / "alpha_sweep.png", len(sweep.points))
    return sweep


def load_doc(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (write one with `dvc exp show --json > {os.fspath(path)}`)")
    doc = json.loads(path.read_text())
    if not isinstance(doc, list):
        raise ValueError(f"{path}: not the output of `dvc exp show --json` (expected a JSON list of rows)")  # noqa: TRY004 - a bad file, reported as such
    return doc
