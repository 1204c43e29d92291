"""Loading Hugging Face models safely: remote code off unless asked for, clear errors, and the
auto class that fits the model (encoder-decoders such as T5, Flan-T5 and BART load with
`AutoModelForSeq2SeqLM`, everything else with `AutoModelForCausalLM`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by the loaders only: `is_encoder_decoder` stays light
    import torch


def is_encoder_decoder(model_dir: str | Path) -> bool:
    """True for an encoder-decoder (T5, Flan-T5, BART, ...), from its config.json alone."""
    path = Path(model_dir) / "config.json"
    try:
        return bool(json.loads(path.read_text()).get("is_encoder_decoder", False))
    except (OSError, ValueError):
        return False


def auto_model_class(model_dir: str | Path):
    """`AutoModelForSeq2SeqLM` for an encoder-decoder, else `AutoModelForCausalLM`."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if is_encoder_decoder(model_dir) else AutoModelForCausalLM


def load_model(model_dir: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """Return `(model, tokenizer)` from a local HF directory, in eval mode on `device`, with the
    auto class that fits it (`auto_model_class`)."""
    import torch
    from transformers import AutoTokenizer

    from .model_files import require_model_dir

    model_dir = require_model_dir(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = auto_model_class(model_dir).from_pretrained(model_dir, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code)
    return model.to(device).eval(), tokenizer
