"""Which lm-eval model runs a model directory: `hf` (transformers, anywhere) or `vllm` (CUDA).

Evaluation and submission both go through the object `make_lm` returns, so one code path serves
both backends; `model_args` is the pure part (tested without either backend's heavy imports).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from ..checkpoint import require_model_dir
from ..params import EvalParams

VLLM_INSTALL = "pip install 'mergeflow[vllm]'"


def vllm_available() -> bool:
    """True when `import vllm` would find the package (it is not imported here: that takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_backend(backend: str, *, has_vllm: bool | None = None, has_cuda: bool | None = None) -> str:
    """`auto` -> `vllm` when vllm is installed and a CUDA device is visible, else `hf`.

    Asking for `vllm` explicitly without it installed is an error that says how to install it.
    """
    if backend not in ("auto", "vllm", "hf"):
        raise ValueError(f"unknown eval backend {backend!r}; expected auto, vllm or hf")
    if backend == "hf":
        return "hf"
    has_vllm = vllm_available() if has_vllm is None else has_vllm
    if backend == "vllm":
        if not has_vllm:
            raise ValueError(f"the vllm backend needs the `vllm` package, which is not installed: {VLLM_INSTALL} (CUDA machines only), or use the hf backend")
        return "vllm"
    has_cuda = cuda_available() if has_cuda is None else has_cuda
    return "vllm" if has_vllm and has_cuda else "hf"


def _hf_device(device: str) -> str:
    if device != "auto":
        return device
    return "cuda" if cuda_available() else "cpu"


def model_args(backend: str, model_dir: str | Path, params: EvalParams) -> dict[str, Any]:
    """Keyword arguments of lm-eval's `HFLM` (backend `hf`) or `VLLM` (backend `vllm`) for `model_dir`."""
    pretrained = str(model_dir)
    if backend == "hf":
        hf = params.hf
        return {
            "pretrained": pretrained,
            "dtype": hf.dtype,
            "batch_size": hf.batch_size,
            "device": _hf_device(hf.device),
            "trust_remote_code": params.trust_remote_code,
        }
    if backend == "vllm":
        v = params.vllm
        args: dict[str, Any] = {
            "pretrained": pretrained,
            "dtype": v.dtype,
            "tensor_parallel_size": v.tensor_parallel_size,
            "gpu_memory_utilization": v.gpu_memory_utilization,
            "batch_size": v.batch_size,
            "trust_remote_code": params.trust_remote_code,
        }
        if v.max_model_len is not None:
            args["max_model_len"] = v.max_model_len
        if v.tokenizer is not None:
            args["tokenizer"] = v.tokenizer
        return args
    raise ValueError(f"model_args: backend must be hf or vllm (resolve `auto` first), got {backend!r}")


def make_lm(model_dir: str | Path, params: EvalParams):
    """The lm-eval LM for `model_dir` on the backend `params.backend` resolves to."""
    model_dir = require_model_dir(model_dir)
    backend = resolve_backend(params.backend)
    args = model_args(backend, model_dir, params)
    if backend == "vllm":
        from lm_eval.models.vllm_causallms import VLLM

        return VLLM(**args)
    from lm_eval.models.huggingface import HFLM

    return HFLM(**args)
