"""Experts given as LoRA adapters (PEFT format), materialised onto their base model.

The LLM-Merging competition's experts are often LoRA adapters of different ranks. Grams and every
merge method need full weights, so the download stage applies each adapter to the base with PEFT's
own `merge_and_unload` (whatever its rank, scaling or variant) and saves an ordinary model
directory. This loads the base once per adapter in its own dtype (16 GB for a bf16 8B model).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from ..atomic import atomic_dir
from ..model_files import require_model_dir

log = logging.getLogger(__name__)
ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "chat_template.jinja")


def is_adapter(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file() and not (Path(path) / "config.json").is_file()


def materialise_adapter(adapter: Path, base: Path, out: Path, *, trust_remote_code: bool = False) -> dict:
    """Write base + adapter (merged) to `out`; return the adapter's rank and target modules."""
    import torch
    from peft import PeftModel

    from ..models import auto_model_class

    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    if config.get("peft_type", "LORA") not in ("LORA", "ADALORA", "IA3", "LOHA", "LOKR"):
        raise ValueError(f"{adapter / ADAPTER_CONFIG}: peft_type {config.get('peft_type')!r} cannot be merged into the weights")
    require_model_dir(base, f"the adapter {adapter} needs its full base model")
    declared = config.get("base_model_name_or_path")
    if declared and Path(declared).name != base.name and declared not in str(base):
        log.warning("%s was trained on %s; applying it to %s", adapter, declared, base)
    model = auto_model_class(base).from_pretrained(base, dtype="auto", trust_remote_code=trust_remote_code)
    with torch.no_grad():
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        for name in TOKENIZER_FILES:  # the adapter's tokenizer if it ships one, else the base's
            src = adapter / name if (adapter / name).is_file() else base / name
            if src.is_file():
                shutil.copy2(src, tmp / name)
        if (base / "generation_config.json").is_file() and not (tmp / "generation_config.json").is_file():
            shutil.copy2(base / "generation_config.json", tmp / "generation_config.json")
    info = {"adapter": str(adapter), "rank": config.get("r"), "target_modules": config.get("target_modules")}
    log.info("materialised adapter %s (rank %s) onto %s -> %s", adapter, info["rank"], base, out)
    return info
