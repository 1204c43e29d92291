"""Computing an expert's diagonal Fisher on its calibration data.

The estimator is the *empirical* Fisher of the text: for each calibration row x (the rows and
tokens the grams use: `gram.text_field`, `max_length`, `num_samples`, `seed`),

    F = 1/N sum_x (d log p(x) / d theta)^2,   log p(x) = sum_t log p(x_t | x_<t),

the squared gradient of the row's own log-likelihood, taken row by row (vmapped over rows of one
length), averaged over rows.
Matena & Raffel (2022) define the Fisher with labels sampled from the model, E_{y~p} (d log p(y|x))^2;
for a language model on its calibration text the tokens of that text are the labels it was tuned to
produce, and using them needs no sampling, so the result is deterministic (bit-identical across
runs and thread counts, as every hashed output here) and costs one forward and backward per row.

Memory: the model, one accumulator per parameter, and the per-row gradients of one pass
(`BATCH_BYTES`, 1 GiB: as many rows as fit, at most 32; one row for models over 256M parameters).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from ..model_files import torch_dtype
from ..grams.data import load_rows, tokenize
from ..grams.format import model_identity, sha256_of
from ..models import load_model
from .format import check_fisher_output, write_fisher

log = logging.getLogger(__name__)


BATCH_BYTES = 2**30  # per-row gradients held at once: rows per pass = this / the model's float32 bytes, at most 32


def rows_per_pass(num_params: int) -> int:
    """How many rows' gradients one vmapped pass computes: a fixed budget, so the same on every machine."""
    return max(1, min(32, BATCH_BYTES // (4 * num_params)))


def same_length_batches(rows: Sequence[list[int]], size: int) -> list[list[list[int]]]:
    """Rows of equal length in batches of at most `size` (no padding: every row's log-likelihood is exact)."""
    by_length: dict[int, list[list[int]]] = {}
    for ids in rows:
        by_length.setdefault(len(ids), []).append(ids)
    return [group[i : i + size] for _, group in sorted(by_length.items()) for i in range(0, len(group), size)]


def fisher_of_rows(model: torch.nn.Module, rows: Sequence[list[int]], *, device: str, dtype: torch.dtype, desc: str = "fisher") -> tuple[dict[str, torch.Tensor], int]:
    """The mean over `rows` of each parameter's squared gradient of log p(row), and how many rows
    counted (a row of one token predicts nothing and is left out). Per-row gradients come from
    `torch.func.vmap(grad(...))` over batches of equal-length rows (`functional_call` keeps tied
    weights tied)."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def log_p(p: dict, ids: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, p, args=(), kwargs={"input_ids": ids[None], "use_cache": False}).logits[0, :-1]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 models: the loss in float32
        return -torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum")

    per_row_grads = vmap(grad(log_p), in_dims=(None, 0))
    sums = {name: torch.zeros(p.shape, dtype=dtype, device=device) for name, p in params.items()}
    usable = [ids for ids in rows if len(ids) > 1]
    if not usable:
        raise ValueError("no calibration row has two tokens or more; the Fisher needs text to predict")
    batches = same_length_batches(usable, rows_per_pass(sum(p.numel() for p in params.values())))
    for batch in tqdm(batches, desc=desc, unit="batch"):
        grads = per_row_grads(params, torch.tensor(batch, device=device))
        for name, g in grads.items():
            sums[name].add_(g.to(dtype).square_().sum(0))
        del grads
    return {name: s.div_(len(usable)).cpu() for name, s in sums.items()}, len(usable)


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
    model, tokenizer = load_model(model_dir, device=device, dtype=torch_dtype(model_dtype))
    rows = tokenize(selected, tokenizer, max_length)
    if hasattr(model, "set_attn_implementation"):  # SDPA has no vmap batching rule on CPU: eager attention batches
        model.set_attn_implementation("eager")
    with torch.enable_grad():
        fisher, used = fisher_of_rows(model, rows, device=device, dtype=torch_dtype(dtype), desc=f"fisher {model_dir.name}")
    stored = set(_stored_names(model_dir))
    fisher = {name: f for name, f in fisher.items() if name in stored}  # a tied lm_head is stored as the embeddings
    calibration = {"sha256": sha256_of(data), "rows": len(selected), "text_field": text_field, "num_samples": num_samples, "seed": seed, "max_length": max_length}
    write_fisher(out, fisher, torch_dtype(dtype), estimator="empirical", num_examples=used, model=str(model_dir), model_id=model_identity(model_dir), calibration=calibration)
    log.info("Fisher of %s: %d tensors, %d rows -> %s", model_dir, len(fisher), used, out)
    return used


def _stored_names(model_dir: Path) -> list[str]:
    from ..model_files import CheckpointReader

    return CheckpointReader(model_dir).names()
