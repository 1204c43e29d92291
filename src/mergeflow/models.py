"""Loading Hugging Face causal LMs safely: remote code off unless asked for, clear errors."""

from __future__ import annotations

from pathlib import Path

import torch


def load_causal_lm(model_dir: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """Return `(model, tokenizer)` from a local HF directory, in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; expected a Hugging Face model directory")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.to(device).eval(), tokenizer
