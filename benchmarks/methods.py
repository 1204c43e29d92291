"""Every registered merge method at its declared defaults: wall time, peak memory and scores.

    python benchmarks/methods.py --root ../smol --name smollm2 --evaluate   # a SmolLM2 checkout after `dvc repro`
    python benchmarks/methods.py --root . --name toy --evaluate             # the toy zoo
    python benchmarks/methods.py --synthetic smollm2-shapes                 # random weights and grams, memory and time only

`--root` is a mergeflow checkout whose pipeline has run: models/base, models/experts/<expert>,
models/grams/<expert>, data/, params.yaml and metrics/ (the base's and the experts' scores);
nothing in it is written. `--synthetic CASE` instead builds (once, under benchmarks/.synthetic/)
random experts, a base and grams of one of synthetic.py's shapes. Each merge is `mergeflow merge --method M` (no method options: the
declared defaults; grams for methods that read them, the base for those that need it) in a
subprocess whose tree `memory.py` polls for peak anonymous memory. With `--evaluate` each merged
model is scored on the recipe's lm-eval tasks (params.yaml `eval`, no sample logs), and the table
shows base, experts and every method with lm-eval's standard errors. Results go to
benchmarks/results/methods-<name>.json and a Markdown table on stdout.

The methods that read the calibration data (`regmean_pp`; `fisher`, whose Fisher directories are
computed first, once per expert, into the work folder and timed apart) run as the pipeline runs
them: `stages/merge.py` (and `stages/fisher.py`) of `--root` with a copy of its params.yaml whose
`method` is theirs, so their rows are chosen and tokenised as the recipe's grams were.
`--sweep FILE` adds runs with one parameter changed: a YAML mapping `method: {param: [values]}`
(e.g. `ties: {density: [0.5, 0.8]}`, `regmean: {alpha: [0.5, 0.9]}`), each value one merge.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from memory import measure  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MIB = 2**20
EVALUATE = """
import mergeflow.pinned  # noqa: F401  the kernels the stages use
import sys
from mergeflow.evaluation.harness import evaluate_model
from mergeflow.params import load_params
root, model, out = sys.argv[1:]
e = load_params(f"{root}/params.yaml").eval
evaluate_model(model, e.tasks, out, params=e, data_root=root)
"""


STAGED = ("regmean_pp", "fisher")  # read calibration rows: run through the root's stages and gram params


def merge_command(method: str, root: Path, experts: list[str], out: Path, values: dict | None = None) -> list[str]:
    from mergeflow.methods import get_method

    cls = get_method(method)
    cmd = [sys.executable, "-m", "mergeflow", "merge", "--method", method, "--out", str(out), "--force"]
    for name, value in (values or {}).items():
        cmd += ["--param", f"{name}={json.dumps(value)}"]
    for e in experts:
        cmd += ["--model", str(root / "models" / "experts" / e)]
    if cls.uses_grams:
        for e in experts:
            cmd += ["--gram", str(root / "models" / "grams" / e)]
    if cls.uses_base:
        cmd += ["--base", str(root / "models" / "base")]
    return cmd


def evaluate(root: Path, model: Path, out: Path) -> tuple[dict, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", EVALUATE, str(root), str(model), str(out)], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"evaluating {model} failed:\n{proc.stderr[-2000:]}")
    return json.loads(out.read_text()), time.perf_counter() - start


def staged_params(root: Path, method: str, values: dict, path: Path) -> Path:
    """A copy of the root's params.yaml with `method` and `values` (alpha top level, the rest in `merge`)."""
    import yaml

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["method"] = method
    for name, value in values.items():
        (params if name == "alpha" else params["merge"])[name] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def fisher_dirs(root: Path, experts: list[str], work: Path) -> float:
    """Each expert's Fisher under work/fisher-dirs/ (once), as the `fisher@<expert>` stage computes it; its seconds."""
    params, start = staged_params(root, "fisher", {}, work / "params-fisher.yaml"), time.perf_counter()
    for e in experts:
        if not (work / "fisher-dirs" / e / "fisher.json").is_file():
            subprocess.run([sys.executable, "stages/fisher.py", "--params", str(params), "--model", f"models/experts/{e}", "--data", f"data/calib/{e}.jsonl",
                            "--out", str(work / "fisher-dirs" / e)], cwd=root, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def stage_command(method: str, root: Path, work: Path, label: str, values: dict) -> list[str]:
    params = staged_params(root, method, values, work / f"params-{label}.yaml")
    return [sys.executable, "stages/merge.py", "--params", str(params), "--experts", "models/experts", "--grams", "models/grams", "--fisher", str(work / "fisher-dirs"),
            "--calib", "data/calib", "--base", "models/base", "--out", str(work / label)]


def label_of(method: str, values: dict) -> str:
    return " ".join([method, *(f"{k}={json.dumps(v)}" for k, v in values.items())])


def run_method(method: str, root: Path, experts: list[str], work: Path, evaluate_it: bool, values: dict | None = None) -> dict:
    values = values or {}
    label = label_of(method, values)
    out = work / label
    row = {"method": method, "label": label, "values": values}
    if method in STAGED:
        if method == "fisher":
            row["fisher_seconds"] = round(fisher_dirs(root, experts, work), 2)
        shutil.rmtree(out, ignore_errors=True)  # the stage replaces only what mergeflow wrote: a merged model of an earlier run
        cmd, cwd = stage_command(method, root, work, label, values), root
    else:
        cmd, cwd = merge_command(method, root, experts, out, values), None
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = measure(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime  # user + sys of the merge: less sensitive to other load than wall time
    row.update({"seconds": round(m.seconds, 2), "cpu_seconds": round(cpu, 2), "peak_anon_mib": round(m.peak_anon_bytes / MIB, 1),
                "peak_rss_mib": round(m.peak_rss_bytes / MIB, 1), "returncode": m.returncode})
    if m.returncode == 0 and evaluate_it:
        row["metrics"], row["eval_seconds"] = evaluate(root, out, work / f"{label}.json")
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def score_text(metrics: dict | None, task: str, metric: str) -> str:
    if not metrics or task not in metrics or metric not in metrics[task]:
        return "-"
    value, err = metrics[task][metric], metrics[task].get(f"{metric}_stderr")
    return f"{value:.3f} ± {err:.3f}" if err is not None else f"{value:.3f}"


def table(result: dict) -> str:
    """Markdown: base, experts, then every method (time, memory, each task's score ± stderr)."""
    base = result["base"] or {}
    columns = [(task, metric) for task, values in base.items() for metric in values if not metric.endswith("_stderr")]
    rows = [["model", "merge s (CPU s)", "peak anon MiB", "peak RSS MiB", *(f"{t} {m}" for t, m in columns)], ["---"] * (4 + len(columns))]
    if columns:
        for name, metrics in [("base", base)] + [(f"expert {e}", m) for e, m in result["experts"].items()]:
            rows.append([name, "", "", "", *(score_text(metrics, t, m) for t, m in columns)])
    for row in result["methods"]:
        if row["returncode"]:
            rows.append([row.get("label", row["method"]), f"failed (exit {row['returncode']})", "", "", *("-" for _ in columns)])
            continue
        cpu = f" ({row['cpu_seconds']:.1f})" if "cpu_seconds" in row else ""
        rows.append([row.get("label", row["method"]), f"{row['seconds']:.1f}{cpu}", f"{row['peak_anon_mib']:.0f}", f"{row['peak_rss_mib']:.0f}",
                     *(score_text(row.get("metrics"), t, m) for t, m in columns)])
    return "\n".join("| " + " | ".join(cells) + " |" for cells in rows)


def synthetic_root(case: str) -> Path:
    """A root with models/base, models/experts/expert{0,1} and models/grams/expert{0,1} of `case`."""
    from synthetic import CASES, make_expert, make_grams

    root = Path(__file__).parent / ".synthetic" / case
    models = root / "models"
    for name, seed in (("base", 7), ("experts/expert0", 0), ("experts/expert1", 1)):
        if not (models / name / "config.json").is_file():
            make_expert(models / name, CASES[case], seed=seed)
    for i in range(2):
        if not (models / "grams" / f"expert{i}" / "grams.json").is_file():
            make_grams(models / "grams" / f"expert{i}", CASES[case], seed=100 + i, lm_head=False)
    return root


def sweep_runs(path: Path | None) -> list[tuple[str, dict]]:
    """(method, {param: value}) for each value of each param of a `--sweep` file."""
    if path is None:
        return []
    import yaml

    spec = yaml.safe_load(path.read_text()) or {}
    return [(method, {name: value}) for method, params in spec.items() for name, values in params.items() for value in values]


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("."), help="a checkout whose pipeline has run (read only)")
    parser.add_argument("--synthetic", default=None, help="a case of synthetic.py instead of --root (no evaluation)")
    parser.add_argument("--name", default=None, help="results go to benchmarks/results/methods-NAME.json [default: the --synthetic case, else toy]")
    parser.add_argument("--methods", default=None, help="comma-separated subset; \"\" for none (with --sweep: only the sweep) [default: every registered method]")
    parser.add_argument("--evaluate", action="store_true", help="score each merged model on params.yaml's eval tasks")
    parser.add_argument("--work", type=Path, default=None, help="where the merged models go [default: a temporary folder, removed]")
    parser.add_argument("--sweep", type=Path, default=None, help="YAML `method: {param: [values]}`: one more merge per value (one param changed at a time)")
    args = parser.parse_args()

    from mergeflow.methods import available
    from mergeflow.params import load_params

    if args.synthetic:
        root, experts, args.evaluate = synthetic_root(args.synthetic), ["expert0", "expert1"], False
    else:
        root = args.root.resolve()
        experts = load_params(root / "params.yaml").experts
    methods = [m for m in args.methods.split(",") if m] if args.methods is not None else available()  # --methods "": the sweep only
    with tempfile.TemporaryDirectory(prefix="mergeflow-methods-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        runs = [(m, {}) for m in methods] + sweep_runs(args.sweep)
        result = {
            "root": root.name, "experts": {e: read_json(root / "metrics" / "experts" / f"{e}.json") for e in experts},
            "base": read_json(root / "metrics" / "base.json"), "methods": [],
        }
        RESULTS.mkdir(exist_ok=True)
        for m, values in runs:  # the file after every run: a long run stopped half way keeps what it measured
            result["methods"].append(run_method(m, root, experts, work, args.evaluate, values))
            (RESULTS / f"methods-{args.name or args.synthetic or 'toy'}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
