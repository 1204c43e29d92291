"""The task YAMLs shipped in the package, rendered so that their local data files resolve.

lm-eval resolves a relative `data_files` path against the current directory, not the YAML's, so
the shipped YAMLs are copied into a temporary folder with every `data_files` path made absolute
against `data_root` (the repository root in the pipeline).
"""

from __future__ import annotations

from pathlib import Path

import yaml

TASK_DIR = Path(__file__).parent / "tasks"


def shipped_tasks() -> list[str]:
    return sorted(yaml.safe_load(p.read_text())["task"] for p in TASK_DIR.glob("*.yaml"))


def _absolute(files, root: Path):
    if isinstance(files, str):
        return str((root / files).resolve())
    if isinstance(files, list):
        return [_absolute(f, root) for f in files]
    return {split: _absolute(f, root) for split, f in files.items()}


def render_tasks(dest: Path, data_root: Path) -> Path:
    """Copy the shipped YAMLs into `dest` with absolute `data_files`; return `dest`."""
    for src in sorted(TASK_DIR.glob("*.yaml")):
        config = yaml.safe_load(src.read_text())
        files = config.get("dataset_kwargs", {}).get("data_files")
        if files is not None:
            config["dataset_kwargs"]["data_files"] = _absolute(files, data_root)
        (dest / src.name).write_text(yaml.safe_dump(config, sort_keys=False))
    return dest
