"""Computing an expert's diagonal Fisher on its calibration data.

The estimator is the *empirical* Fisher of the text: for each calibration row x (the rows and
tokens the grams use: `gram.text_field`, `max_length`, `num_samples`, `seed`),

    F = 1/N sum_x (d log p(x) / d theta)^2,   log p(x) = sum_t log p(x_t | x_<t),

the squared gradient of the row's own log-likelihood, one row at a time, averaged over rows.
Matena & Raffel (2022) define the Fisher with labels sampled from the model, E_{y~p} (d log p(y|x))^2;
for a language model on its calibration text the tokens of that text are the labels it was tuned to
produce, and using them needs no sampling, so the result is deterministic (bit-identical across
runs and thread counts, as every hashed output here) and costs one forward and backward per row.

Memory: the model, its gradients and one accumulator per parameter (3 x the model in float32).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..grams.collect import DTYPES
from ..grams.data import load_rows, tokenize
from ..grams.format import model_identity, sha256_of
from ..models import load_causal_lm
from .format import check_fisher_output, write_fisher

log = logging.getLogger(__name__)


def log_likelihood(model: torch.nn.Module, ids: list[int], device: str) -> torch.Tensor:
    """log p(ids[1:] | prefix) of one row, summed over its tokens (a scalar with a graph)."""
    tokens = torch.tensor([ids], device=device)
    logits = model(input_ids=tokens, use_cache=False).logits[0, :-1].float()
    return -torch.nn.functional.cross_entropy(logits, tokens[0, 1:], reduction="sum")


def fisher_of_rows(model: torch.nn.Module, rows: list[list[int]], *, device: str, dtype: torch.dtype, desc: str = "fisher") -> tuple[dict[str, torch.Tensor], int]:
    """The mean over `rows` of each parameter's squared gradient of log p(row); and how many rows
    counted (a row of one token predicts nothing and is left out)."""
    params = {name: p for name, p in model.named_parameters()}
    for p in params.values():
        p.requires_grad_(True)
    sums = {name: torch.zeros(p.shape, dtype=dtype, device=device) for name, p in params.items()}
    used = 0
    for ids in tqdm(rows, desc=desc, unit="row"):
        if len(ids) < 2:
            continue
        model.zero_grad(set_to_none=True)
        log_likelihood(model, ids, device).backward()
        for name, p in params.items():
            if p.grad is not None:
                grad = p.grad.to(dtype)
                sums[name].addcmul_(grad, grad)
        used += 1
    model.zero_grad(set_to_none=True)
    if not used:
        raise ValueError("no calibration row has two tokens or more; the Fisher needs text to predict")
    return {name: s.div_(used).cpu() for name, s in sums.items()}, used


def compute_fisher(
    model_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    text_field: str = "text",
    max_length: int = 64,
    num_samples: Optional[int] = None,
    seed: Optional[int] = None,
    device: str = "cpu",
    model_dtype: str = "float32",
    dtype: str = "float32",
) -> int:
    """Compute the diagonal Fisher of `model_dir` on `data` and write it to `out`; return the rows used."""
    model_dir, data, out = Path(model_dir), Path(data), Path(out)
    if dtype not in ("float32", "float64"):
        raise ValueError(f"Fisher dtype must be float32 or float64, got {dtype!r}")
    check_fisher_output(out, inputs=[model_dir, data])
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    selected = load_rows(data, text_field, num_samples=num_samples, seed=seed)
    model, tokenizer = load_causal_lm(model_dir, device=device, dtype=DTYPES[model_dtype])
    rows = tokenize(selected, tokenizer, max_length)
    with torch.enable_grad():
        fisher, used = fisher_of_rows(model, rows, device=device, dtype=DTYPES[dtype], desc=f"fisher {model_dir.name}")
    stored = set(_stored_names(model_dir))
    fisher = {name: f for name, f in fisher.items() if name in stored}  # a tied lm_head is stored as the embeddings
    calibration = {"sha256": sha256_of(data), "rows": len(selected), "text_field": text_field, "num_samples": num_samples, "seed": seed, "max_length": max_length}
    write_fisher(out, fisher, DTYPES[dtype], estimator="empirical", num_examples=used, model=str(model_dir), model_id=model_identity(model_dir), calibration=calibration)
    log.info("Fisher of %s: %d tensors, %d rows -> %s", model_dir, len(fisher), used, out)
    return used


def _stored_names(model_dir: Path) -> list[str]:
    from ..checkpoint import CheckpointReader

    return CheckpointReader(model_dir).names()
