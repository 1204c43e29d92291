"""A study's results: the table `dvc plots` draws, a PNG of it, and `--apply` into params.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..plots import write_csv
from .experiments import override

TABLE_DIR = Path("metrics") / "tune"


def _flat(values: dict[str, Any]) -> dict[str, Any]:
    """`{merge.weights: [a, b]}` -> `{merge.weights.0: a, merge.weights.1: b}` (one column each)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, list):
            out.update({f"{key}.{i}": v for i, v in enumerate(value)})
        else:
            out[key] = value
    return out


def table_rows(study) -> tuple[tuple[str, ...], list[tuple]]:
    """One row per finished trial: its objective (empty when it failed), the best so far, its params."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "FAIL") and not t.user_attrs.get("interrupted")]
    keys: list[str] = []
    for t in trials:
        keys += [k for k in _flat(t.user_attrs.get("values") or {}) if k not in keys]
    maximize = study.direction.name == "MAXIMIZE"
    best = None
    rows = []
    for t in trials:
        value = t.value if t.state.name == "COMPLETE" else None
        if value is not None and (best is None or (value > best if maximize else value < best)):
            best = value
        flat = _flat(t.user_attrs.get("values") or {})
        rows.append((t.number, t.state.name.lower(), "" if value is None else value, "" if best is None else best,
                     t.user_attrs.get("experiment", ""), *(flat.get(k, "") for k in keys)))
    return ("trial", "state", "objective", "best", "experiment", *keys), rows


def write_table(root: Path, study) -> Path:
    """`metrics/tune/<study>.csv`: dvc.yaml's `tune` plot draws objective and best against trial."""
    header, rows = table_rows(study)
    path = root / TABLE_DIR / f"{study.study_name}.csv"
    write_csv(path, header, rows)
    return path


def plot(study, path: Path) -> None:
    """Objective of every trial and the best so far; below, each param of every trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import atomic_file

    header, rows = table_rows(study)
    keys = header[5:]
    fig, axes = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    done = [r for r in rows if r[2] != ""]
    axes[0].scatter([r[0] for r in done], [r[2] for r in done], label="trial objective")
    axes[0].step([r[0] for r in rows if r[3] != ""], [r[3] for r in rows if r[3] != ""], where="post", color="tab:red", label="best so far")
    failed = [r[0] for r in rows if r[1] == "fail"]
    if failed:
        axes[0].scatter(failed, [min((r[2] for r in done), default=0)] * len(failed), marker="x", color="black", label="failed")
    axes[0].set_ylabel("objective (validation tasks)")
    axes[0].legend(fontsize=8)
    for i, key in enumerate(keys):
        points = [(r[0], r[5 + i]) for r in rows if isinstance(r[5 + i], (int, float))]
        axes[1].plot([p[0] for p in points], [p[1] for p in points], marker="o", linestyle=":", label=key)
    axes[1].set_xlabel("trial")
    axes[1].set_ylabel("value")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"mergeflow tune: study {study.study_name}")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def apply_values(params_file: Path, values: dict[str, Any]) -> list[str]:
    """Write the promoted trial's values into the params file, exactly as `dvc exp run -S` wrote
    them into its experiment's (DVC's own override code, which keeps the file's comments)."""
    import shutil
    import tempfile

    from dvc.utils.hydra import apply_overrides

    from ..atomic import atomic_file

    items = [override(k, v) for k, v in values.items()]
    with tempfile.TemporaryDirectory() as scratch:  # DVC picks the format by suffix: edit a copy, then swap it in
        copy = Path(scratch) / f"params{params_file.suffix}"
        shutil.copyfile(params_file, copy)
        apply_overrides(copy, items)
        with atomic_file(params_file) as tmp:
            shutil.copyfile(copy, tmp)
    return items
