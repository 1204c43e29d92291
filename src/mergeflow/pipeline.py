"""The parts of `dvc.yaml` that follow the params file: the download stages, the merge stage's
per-expert dependencies, and hub revisions pinned to commits.

DVC cannot turn a params value into a dependency, so a local model directory, a calibration file
or a moving hub branch named in `params.yaml` would be invisible to `dvc status`. `mergeflow use`
therefore writes them into `dvc.yaml` as real dependencies, stage by stage:

- `download-base`: the base model (a local directory is a dependency; a hub base is read through
  its `models.hub.base` params, pinned to a commit);
- `download@<expert>`: one stage per expert, depending on `models/base` (the zoos train from it,
  adapters merge into it), on its own local directory and calibration file, and on its own
  params only, so changing one expert never rebuilds another;
- `download-eval`: the evaluation data and the test file (local files as dependencies);
- `merge`: one `models/experts/<e>`, `models/grams/<e>`, `models/fisher/<e>` and `data/calib/<e>.jsonl` per expert (`dvc repro --pull`
  fetches only dependencies that are some stage's output, never a folder holding several);
- `evaluate-base`, `evaluate-expert`, `evaluate`: after their `data/eval` dependency, the local
  data files of the tasks of `eval.tasks` (`eval.data_files`, or a shipped task's default).

Each download and evaluate stage compares `dvc.yaml` with what this module generates from the
params and refuses to run on a mismatch (a local input DVC would not be watching), naming the fix.
"""

from __future__ import annotations

import io
import logging
import os
import re
from pathlib import Path
from typing import Any

from .atomic import atomic_file
from .params import Params

log = logging.getLogger(__name__)

CODE = ["stages/download.py", "src/mergeflow/zoo", "src/mergeflow/determinism.py", "src/mergeflow/models.py"]
DOWNLOAD_STAGES = ("download-base", "download", "download-eval")
EVALUATE_STAGES = ("evaluate-base", "evaluate-expert", "evaluate")
EVAL_DATA = "data/eval"  # an evaluate stage's deps after this one are its `eval.data_files`
PLUGIN_DIR = "methods"
# the merge stage's per-expert inputs (folder, suffix), in the order dvc.yaml lists them
MERGE_INPUTS = (("models/experts", ""), ("models/grams", ""), ("models/fisher", ""), ("data/calib", ".jsonl"))  # merge method plugins (`method: methods/x.py:Class`) live here: a dependency of merge

# The fields of each zoo's params that each step reads: the params of its stage.
_TOY_ARCH = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads")
ZOO_PARAMS = {
    "toy": {
        "base": ("seed", *_TOY_ARCH, "batch_size", "base_steps", "base_lr"),
        "expert": ("seed", *_TOY_ARCH, "batch_size", "expert_steps", "expert_lr", "calib_samples", "eval_samples", "test_rows"),
        "eval": ("seed", "eval_samples", "test_rows"),
    },
    "smollm2": {
        "base": ("package", "file"),
        "expert": ("seed", "train_layers", "train_modules", "batch_size", "steps", "lr", "calib_samples", "eval_samples", "test_rows"),
        "eval": ("seed", "eval_samples", "test_rows"),
    },
}


def _train_csv(name: str) -> dict:
    """A training loss curve (`step,loss`): small, kept in git like the metrics."""
    return {f"metrics/train/{name}.csv": {"cache": False}}


def download_stages(params: Params) -> dict[str, dict]:
    """The three download stages of `dvc.yaml` for `params`, as plain data."""
    source = params.models.source
    if source in ZOO_PARAMS:
        keys = {role: [f"models.{source}.{k}" for k in fields] for role, fields in ZOO_PARAMS[source].items()}
        trains_base = source == "toy"
        base = {
            "cmd": "python stages/download.py base" + (" --losses metrics/train/base.csv" if trains_base else ""),
            "deps": list(CODE),
            "params": ["models.source", *keys["base"]],
            "outs": ["models/base", *([_train_csv("base")] if trains_base else [])],
        }
        experts = {
            "matrix": {"expert": "${experts}"},
            "cmd": "python stages/download.py expert ${item.expert} --losses metrics/train/${item.expert}.csv",
            "deps": [*CODE, "models/base"],
            "params": ["models.source", *keys["expert"]],
            "outs": ["models/experts/${item.expert}", "data/calib/${item.expert}.jsonl", _train_csv("${item.expert}")],
        }
        evaluation = {
            "cmd": "python stages/download.py eval",
            "deps": [*CODE, *(["models/base"] if source == "smollm2" else [])],  # smollm2: the base's chat template
            "params": ["models.source", "experts", *keys["eval"]],
            "outs": ["data/eval", "data/test.csv"],
        }
        return {"download-base": base, "download": experts, "download-eval": evaluation}
    local = source == "local"
    group = params.models.local if local else params.models.hub
    base = {
        "cmd": "python stages/download.py base",
        "deps": [*CODE, *([group.base] if local else [])],
        "params": ["models.source", f"models.{source}.base"],
        "outs": ["models/base"],
    }
    inputs = {e: {**({"model": group.experts[e]} if local else {}), "calib": params.data.calib[e]} for e in params.experts}
    experts = {
        "foreach": inputs,
        "do": {
            "cmd": "python stages/download.py expert ${key}",
            # grams/data.py: how a CSV, JSON or Parquet calibration file becomes calib/<expert>.jsonl
            "deps": [*CODE, "src/mergeflow/grams/data.py", "models/base", *(["${item.model}"] if local else []), "${item.calib}"],
            "params": ["models.source", f"models.{source}.experts.${{key}}", "data.calib.${key}"],
            "outs": ["models/experts/${key}", "data/calib/${key}.jsonl"],
        },
    }
    files = [params.data.eval[e] for e in params.experts if e in params.data.eval]
    evaluation = {
        "cmd": "python stages/download.py eval",
        "deps": [*CODE, *files, *([params.data.test_csv] if params.data.test_csv else [])],
        "params": ["models.source", "experts", "data.eval", "data.test_csv"],
        "outs": ["data/eval", "data/test.csv"],
    }
    return {"download-base": base, "download": experts, "download-eval": evaluation}


def merge_model_deps(experts: list[str]) -> list[str]:
    """The merge stage's per-expert dependencies: each expert's model, gram and Fisher directory,
    and calibration file (RegMean++ forwards it through the merged layers)."""
    return [f"{folder}/{e}{suffix}" for folder, suffix in MERGE_INPUTS for e in experts]


def eval_data_deps(params: Params) -> list[str]:
    """The local files that the evaluate stages read for the tasks of `eval.tasks`: each task's
    `eval.data_files`, else a shipped task's own default (e.g. xsum's data/validation/xsum.csv);
    not those under `data/eval` (already a dependency) nor inside an installed package."""
    from .evaluation.tasks import shipped_configs

    shipped = shipped_configs()
    files: list[str] = []
    for task in params.eval.tasks:
        entry = params.eval.data_files.get(task) or (shipped.get(task, {}).get("dataset_kwargs") or {}).get("data_files")
        for path in ([entry] if isinstance(entry, str) else list((entry or {}).values())):
            if path not in files and not path.startswith((f"{EVAL_DATA}/", "package:")):
                files.append(path)
    return files


def _eval_data_tail(deps: list) -> tuple[int, list]:
    """Where an evaluate stage's generated deps start (after `data/eval`), and those deps."""
    start = next((i + 1 for i, d in enumerate(deps) if d == EVAL_DATA), len(deps))
    return start, list(deps[start:])


def _is_model_dep(dep: Any) -> bool:
    return isinstance(dep, str) and dep.startswith(tuple(folder + "/" for folder, _ in MERGE_INPUTS))


def _plain(data: Any) -> Any:
    """ruamel's commented maps and sequences as plain dicts and lists (for comparisons)."""
    if isinstance(data, dict):
        return {str(k): _plain(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_plain(v) for v in data]
    return data


def _yaml():
    from ruamel.yaml import YAML  # DVC's own YAML library: round trips keep comments and layout

    yaml = YAML()
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096
    yaml.preserve_quotes = True
    return yaml


def _names(items: list) -> list[str]:
    return [x if isinstance(x, str) else next(iter(x)) for x in items]  # `{path: {cache: false}}` -> path


def _describe(old: dict | None, new: dict) -> str:
    """What differs between two stage definitions, briefly: the deps and outs added (+) and
    removed (-), the number of params, the names of other fields."""
    if old is None:
        return "added"
    old, new = ({**d.get("do", {}), **d} for d in (old, new))  # foreach stages keep their body under `do`
    parts = []
    for key in ("foreach", "matrix", "cmd", "deps", "params", "outs"):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, list) and isinstance(b, list):
            added, removed = [x for x in _names(b) if x not in _names(a)], [x for x in _names(a) if x not in _names(b)]
            if key == "params":
                parts.append(f"params +{len(added)} -{len(removed)}")
            else:
                parts.append(key + "".join(f" +{x}" for x in added) + "".join(f" -{x}" for x in removed))
        else:
            parts.append(key)
    return ", ".join(parts) or "layout"


def sync_dvc_yaml(dvc_yaml: Path, params: Params) -> list[str]:
    """Write the download stages and the merge stage's per-expert deps for `params` into
    `dvc_yaml` (everything else, comments included, kept); return one line per change."""
    yaml = _yaml()
    doc = yaml.load(dvc_yaml.read_text())
    stages = doc.get("stages") if doc else None
    if stages is None or "merge" not in stages:
        raise ValueError(f"{dvc_yaml}: has no `merge` stage to point at the experts' models and grams")
    changes = []
    wanted = download_stages(params)
    position = next((i for i, name in enumerate(stages) if name in DOWNLOAD_STAGES), 0)
    for offset, (name, body) in enumerate(wanted.items()):
        old = _plain(stages.get(name))
        if old == body:
            continue
        changes.append(f"{dvc_yaml}: stage {name}: {_describe(old, body)}")
        if name in stages:
            stages[name] = body
        else:
            stages.insert(min(position + offset, len(stages)), name, body)
    deps = stages["merge"].get("deps") or []
    current = [d for d in deps if _is_model_dep(d)]
    new = merge_model_deps(params.experts)
    if _plain(current) != new:
        first = next((i for i, d in enumerate(deps) if _is_model_dep(d)), len(deps))
        for i in reversed([i for i, d in enumerate(deps) if _is_model_dep(d)]):
            del deps[i]
        for i, dep in enumerate(new):
            deps.insert(first + i, dep)
        changes.append(f"{dvc_yaml}: stage merge: {_describe({'deps': current}, {'deps': new})}")
    files = eval_data_deps(params)
    for name in EVALUATE_STAGES:
        if name not in stages:
            continue
        deps = stages[name].setdefault("deps", [])
        start, current = _eval_data_tail(deps)
        if _plain(current) != files:
            del deps[start:]
            deps.extend(files)
            changes.append(f"{dvc_yaml}: stage {name}: {_describe({'deps': current}, {'deps': files})}")
    if changes:
        out = io.StringIO()
        yaml.dump(doc, out)
        with atomic_file(dvc_yaml) as tmp:
            tmp.write_text(_blank_line_between_stages(out.getvalue()))
    return changes


def _blank_line_between_stages(text: str) -> str:
    """One empty line before each stage (or the comment above it), as a person writes dvc.yaml."""
    out: list[str] = []
    in_stages = False
    for line in text.splitlines(keepends=True):
        if re.match(r"[A-Za-z_]", line):  # a top-level key: stages, plots, vars...
            in_stages = line.startswith("stages:")
        elif in_stages and re.match(r"  [A-Za-z_]", line) and out[-1].strip() and not out[-1].startswith(("  #", "stages:")):
            out.append("\n")
        out.append(line)
    return "".join(out)


def out_of_sync(dvc_yaml: Path, params: Params) -> list[str]:
    """The generated parts of `dvc_yaml` that do not match `params` (empty when in sync)."""
    import yaml

    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages") or {}
    wrong = [f"stage {name}" for name, body in download_stages(params).items() if stages.get(name) != body]
    merge_deps = [d for d in (stages.get("merge") or {}).get("deps") or [] if _is_model_dep(d)]
    if merge_deps != merge_model_deps(params.experts):
        wrong.append("the merge stage's per-expert deps (models/experts, models/grams, models/fisher, data/calib)")
    files = eval_data_deps(params)
    wrong += [f"stage {name}'s eval.data_files deps" for name in EVALUATE_STAGES
              if name in stages and _eval_data_tail((stages[name] or {}).get("deps") or [])[1] != files]
    return wrong


def check_in_sync(dvc_yaml: Path, params: Params, params_file: str = "params.yaml") -> None:
    """Refuse (one line) to run a download or evaluate stage that DVC would not rerun when an input changes."""
    if not dvc_yaml.is_file():  # run outside a DVC project: nothing to keep in sync
        return
    wrong = out_of_sync(dvc_yaml, params)
    if wrong:
        raise ValueError(
            f"{dvc_yaml}: {', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} out of date for {params_file} (models.source "
            f"{params.models.source!r}, experts {params.experts}): DVC would not watch every input; "
            f"run `mergeflow use {params_file}` to regenerate {'it' if len(wrong) == 1 else 'them'}"
        )


def check_plugin(method: str, dvc_yaml: Path = Path("dvc.yaml")) -> None:
    """Refuse a plugin merge method whose file is not under the merge stage's plugin folder:
    DVC would not rerun merge when the file changes."""
    path_text, _, _ = method.rpartition(":")
    if not path_text.endswith(".py") or not dvc_yaml.is_file():
        return
    root = dvc_yaml.resolve().parent
    path = Path(path_text)
    path = (path if path.is_absolute() else root / path).resolve()
    if not path.is_relative_to(root / PLUGIN_DIR):
        rel = os.path.relpath(path, root)
        raise ValueError(
            f"params.yaml: method {method!r}: {rel} is not under {PLUGIN_DIR}/, the merge stage's plugin folder, so DVC would not "
            f"rerun merge when it changes; move it there (method: {PLUGIN_DIR}/{Path(path_text).name}:{method.rpartition(':')[2]})"
        )


# --- hub revisions -------------------------------------------------------------------------------


def resolve_revision(repo_id: str, revision: str) -> str | None:
    """The commit that `revision` (a branch or tag) of `repo_id` points at: asked of the hub, or
    read from the Hugging Face cache's refs/ when offline; None when neither knows."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    if not constants.HF_HUB_OFFLINE:
        try:
            from huggingface_hub import HfApi

            return HfApi().model_info(repo_id, revision=revision).sha
        except Exception as err:  # noqa: BLE001  (no network, no access: fall back to the cache)
            log.debug("%s@%s: %s", repo_id, revision, err)
    ref = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs" / revision
    return ref.read_text().strip() if ref.is_file() else None


def pin_hub_revisions(params_file: Path, params: Params) -> list[str]:
    """Replace each moving hub revision in `params_file` by its commit (the text edited in place,
    comments kept); return one line per revision pinned or left moving."""
    from .zoo.sources import is_pinned

    if params.models.source != "hub":
        return []
    hub = params.models.hub
    models = {"base": hub.base, **{f"experts.{e}": m for e, m in hub.experts.items() if e in params.experts}}
    text = params_file.read_text()
    doc = _yaml().load(text)
    lines = text.splitlines(keepends=True)
    report, pinned = [], 0
    for key, model in models.items():
        if is_pinned(model.revision):
            continue
        commit = resolve_revision(model.repo_id, model.revision)
        if commit is None:
            report.append(f"{params_file}: models.hub.{key}.revision stays {model.revision!r} (not in the Hugging Face cache, hub unreachable): "
                          f"DVC cannot tell when it moves; rerun `mergeflow use {params_file}` where the hub is reachable")
            continue
        node = doc["models"]["hub"]
        for part in key.split("."):
            node = node[part]
        line, col = node.lc.value("revision")
        start = lines[line].find(model.revision, col)
        if start < 0:
            raise ValueError(f"{params_file}: line {line + 1}: cannot find revision {model.revision!r} to pin")
        lines[line] = lines[line][:start] + commit + lines[line][start + len(model.revision):]
        report.append(f"{params_file}: models.hub.{key}.revision: {model.revision} -> {commit}")
        pinned += 1
    if pinned:
        with atomic_file(params_file) as tmp:
            tmp.write_text("".join(lines))
    return report
