"""Collecting grams: forward calibration text through a model and sum `x x^T` of Linear inputs.

Forward pre-hooks on every `nn.Linear` inside the transformer blocks see each Linear's input; only
non-padding tokens are kept (right padding, so padding never changes the real tokens'
activations), and the products are accumulated in float32 whatever the model's dtype. Modules fed
the very same input tensor (q/k/v, gate/up) are accumulated once and share one key.
"""

from __future__ import annotations

import logging
import re
import weakref
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models import load_causal_lm
from .format import write_grams

log = logging.getLogger(__name__)
_IN_BLOCK = re.compile(r"(^|\.)layers\.\d+\.")


def block_linears(model: nn.Module, include_lm_head: bool = False) -> dict[str, nn.Linear]:
    """The Linears inside the transformer blocks, by qualified name (`model.layers.0.mlp.up_proj`),
    and the output layer `lm_head` when asked for."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and (_IN_BLOCK.search(name) or (include_lm_head and name == "lm_head"))
    }


class GramAccumulator:
    """Hooks that add each batch's `x^T x` (non-padding rows only) into float32 sums."""

    def __init__(self, linears: dict[str, nn.Linear]):
        self.linears = linears
        self.sums: dict[str, torch.Tensor] = {}
        self.keys: dict[str, str] = {}  # module -> key of the module that first saw its input
        self.num_tokens = 0
        self._mask: torch.Tensor | None = None
        self._seen: dict[int, tuple[weakref.ref, str]] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            ref, owner = self._seen.get(id(x), (None, None))
            if ref is None or ref() is not x:  # a new input (ids of freed tensors get reused)
                owner = name
                self._seen[id(x)] = (weakref.ref(x), name)
            known = self.keys.setdefault(name, owner)
            if known != owner:
                raise RuntimeError(f"{name}: shares its input with {owner} in this batch but not in the first one")
            if owner != name:
                return
            rows = x.reshape(-1, x.shape[-1])[self._mask].to(torch.float32)
            if name not in self.sums:
                self.sums[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
            self.sums[name].addmm_(rows.T, rows)

        return hook

    def add_batch(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self._mask = attention_mask.reshape(-1).bool()
        self._seen = {}
        model(input_ids=input_ids, attention_mask=attention_mask)
        self.num_tokens += int(self._mask.sum())
        self._seen = {}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def read_texts(data: str | Path, text_field: str = "text", num_samples: int | None = None) -> list[str]:
    """The calibration texts of a JSONL file, in file order, the first `num_samples` of them."""
    import pandas as pd

    data = Path(data)
    if not data.is_file():
        raise FileNotFoundError(f"{data}: calibration data file not found (check --data / params.yaml)")
    try:
        frame = pd.read_json(data, lines=True, dtype=False)  # text as written: no "007" -> 7.0
    except ValueError as err:
        raise ValueError(f"{data}: not valid JSON lines ({err})") from None
    if frame.empty:
        raise ValueError(f"{data}: holds no rows; grams need calibration text")
    if text_field not in frame.columns:
        raise ValueError(f"{data}: rows have no {text_field!r} field (fields: {sorted(frame.columns)})")
    missing = frame.index[frame[text_field].isna()].tolist()
    if missing:
        raise ValueError(f"{data}: rows {[i + 1 for i in missing[:5]]} have no {text_field!r} value")
    texts = frame[text_field].astype(str).tolist()
    return texts[:num_samples] if num_samples else texts


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, so little compute goes to padding."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def compute_grams(
    model_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    max_length: int = 64,
    batch_size: int = 32,
    num_samples: int | None = None,
    device: str = "cpu",
    include_lm_head: bool = False,
) -> int:
    """Compute and write the grams of `model_dir` on `data`; return the number of tokens seen."""
    if max_length < 1 or batch_size < 1:
        raise ValueError(f"max_length and batch_size must be at least 1 (got {max_length}, {batch_size})")
    texts = read_texts(data, num_samples=num_samples)
    model, tokenizer = load_causal_lm(model_dir, device=device)
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    acc = GramAccumulator(block_linears(model, include_lm_head))
    if not acc.linears:
        raise ValueError(f"{model_dir}: no nn.Linear inside transformer blocks (`layers.N.`) to compute grams for")
    try:
        bar = tqdm(total=sum(map(len, encoded)), desc=f"grams {Path(model_dir).name}", unit="tok", unit_scale=True)
        for batch in length_sorted_batches([len(ids) for ids in encoded], batch_size):
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[row, : len(encoded[i])] = 1
            acc.add_batch(model, ids.to(device), mask.to(device))
            bar.update(int(mask.sum()))
        bar.close()
    finally:
        acc.close()
    write_grams(out, {k: v.cpu() for k, v in acc.sums.items()}, acc.keys, acc.num_tokens, model=str(model_dir))
    log.info("grams of %s: %d modules (%d distinct inputs), %d tokens -> %s", model_dir, len(acc.keys), len(acc.sums), acc.num_tokens, out)
    return acc.num_tokens
