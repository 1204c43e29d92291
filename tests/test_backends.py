"""Backend choice and the model arguments handed to lm-eval's HF and vLLM models."""

from __future__ import annotations

import importlib.util

import pytest

from mergeflow.evaluation import backends
from mergeflow.evaluation.backends import make_lm, model_args, resolve_backend
from mergeflow.params import EvalParams

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.parametrize(
    ("backend", "has_vllm", "has_cuda", "expected"),
    [
        ("auto", True, True, "vllm"),
        ("auto", True, False, "hf"),
        ("auto", False, True, "hf"),
        ("auto", False, False, "hf"),
        ("hf", True, True, "hf"),
        ("vllm", True, False, "vllm"),  # asked for explicitly: vLLM reports a missing GPU itself
    ],
)
def test_resolve_backend(backend, has_vllm, has_cuda, expected):
    assert resolve_backend(backend, has_vllm=has_vllm, has_cuda=has_cuda) == expected


def test_vllm_asked_for_but_missing_says_how_to_install():
    with pytest.raises(ValueError, match=r"the vllm backend needs the `vllm` package, which is not installed: pip install 'mergeflow\[vllm\]'"):
        resolve_backend("vllm", has_vllm=False)
    with pytest.raises(ValueError, match="unknown eval backend 'tpu'"):
        resolve_backend("tpu")


def test_hf_model_args():
    params = EvalParams(hf={"dtype": "bfloat16", "batch_size": 4, "device": "cuda:1"})
    assert model_args("hf", "models/merged", params) == {"pretrained": "models/merged", "dtype": "bfloat16", "batch_size": 4, "device": "cuda:1", "trust_remote_code": False}


def test_hf_device_auto_follows_cuda(monkeypatch):
    monkeypatch.setattr(backends, "cuda_available", lambda: False)
    assert model_args("hf", "m", EvalParams(hf={"device": "auto"}))["device"] == "cpu"
    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    assert model_args("hf", "m", EvalParams(hf={"device": "auto"}))["device"] == "cuda"


def test_vllm_model_args_from_params():
    params = EvalParams(
        backend="vllm",
        vllm={"dtype": "bfloat16", "tensor_parallel_size": 2, "gpu_memory_utilization": 0.8, "max_model_len": 4096, "tokenizer": "models/base"},
        trust_remote_code=True,
    )
    assert model_args("vllm", "models/merged", params) == {
        "pretrained": "models/merged",
        "dtype": "bfloat16",
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.8,
        "batch_size": "auto",
        "trust_remote_code": True,
        "max_model_len": 4096,
        "tokenizer": "models/base",
    }


def test_vllm_model_args_leave_unset_options_to_vllm():
    args = model_args("vllm", "m", EvalParams())
    assert "max_model_len" not in args and "tokenizer" not in args and "device" not in args
    assert args["trust_remote_code"] is False and args["gpu_memory_utilization"] == 0.9
    with pytest.raises(ValueError, match="resolve `auto` first"):
        model_args("auto", "m", EvalParams())


def test_make_lm_refuses_a_folder_without_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        make_lm(tmp_path, EvalParams())


@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (pip install 'mergeflow[vllm]', CUDA machines only)")
def test_vllm_backend_answers_as_the_hf_backend(experts, tmp_path):
    """With vLLM and a GPU: the same requests get the HF backend's log-likelihoods (float32, to
    within kernel rounding) and the same greedy generations."""
    import torch
    from lm_eval.api.instance import Instance

    if not torch.cuda.is_available():
        pytest.skip("vllm is installed but no CUDA device is visible")
    scored = [("1+1=", " 2"), ("12+5=", " 17"), ("rev(abc)=", " cba")]
    prompts = ["1+1=", "rev(ab)=", "cp(x)="]
    args = {"until": ["\n"], "max_gen_toks": 4, "do_sample": False}
    answers = {}
    for backend, params in [("vllm", EvalParams(backend="vllm", vllm={"dtype": "float32", "gpu_memory_utilization": 0.3, "max_model_len": 64})),
                            ("hf", EvalParams(backend="hf", hf={"dtype": "float32", "device": "cuda"}))]:
        lm = make_lm(experts[0], params)
        assert type(lm).__name__ == {"vllm": "VLLM", "hf": "HFLM"}[backend]
        answers[backend] = (lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(scored)]),
                            lm.generate_until([Instance("generate_until", {}, (p, dict(args)), i) for i, p in enumerate(prompts)]))
        del lm
    (vllm_scores, vllm_texts), (hf_scores, hf_texts) = answers["vllm"], answers["hf"]
    assert [greedy for _, greedy in vllm_scores] == [greedy for _, greedy in hf_scores]
    assert [lp for lp, _ in vllm_scores] == pytest.approx([lp for lp, _ in hf_scores], abs=1e-3)
    assert vllm_texts == hf_texts


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed: the missing-package error cannot happen")
def test_evaluate_with_vllm_missing_fails_before_any_work(experts, tmp_path):
    from mergeflow.evaluation.harness import evaluate_model

    with pytest.raises(ValueError, match=r"pip install 'mergeflow\[vllm\]'"):
        evaluate_model(experts[0], ["toy_math"], tmp_path / "m.json", params=EvalParams(backend="vllm"), data_root=tmp_path)
    assert not (tmp_path / "m.json").exists()
