"""Tied input/output embeddings (SmolLM2, Gemma, small Llamas) under every merge method.

A tied checkpoint usually stores the embeddings once (transformers drops `lm_head.weight`), but
some writers store both copies; either way the merged model must stay tied, with its output
layer equal to its input embeddings, and those embeddings must be the method's merge of the
experts' embeddings (RegMean never solves a tied `lm_head`, even when asked to).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import make_tiny_llama, state
from safetensors.torch import load_file, save_file

from mergeflow.grams.collect import compute_grams
from mergeflow.merge import merge_models
from mergeflow.methods import get_method

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
CASES = {  # name: (method, options, lm_head asked for)
    "average": ("average", {}, False),
    "regmean": ("regmean", {"alpha": 0.3}, False),
    "regmean_lm_head": ("regmean", {"alpha": 0.3}, True),
    "task_arithmetic": ("task_arithmetic", {"scaling": 0.7}, False),
    "ties": ("ties", {"density": 0.4}, False),
}


@pytest.fixture(scope="module")
def tied(tmp_path_factory, calib_file):
    """Two tied experts and a tied base, as transformers saves them (`implicit`: no lm_head.weight)
    and with both copies stored (`explicit`), plus the experts' grams with lm_head."""
    root = tmp_path_factory.mktemp("tied")
    implicit = [make_tiny_llama(root / "implicit" / name, seed=20 + i, tie=True) for i, name in enumerate(("a", "b", "base"))]
    explicit = []
    for src in implicit:
        dst = root / "explicit" / src.name
        shutil.copytree(src, dst)
        tensors = load_file(dst / "model.safetensors")
        assert HEAD not in tensors
        tensors[HEAD] = tensors[EMBED].clone()
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
        explicit.append(dst)
    grams = []
    for m in implicit[:2]:
        compute_grams(m, calib_file, root / f"grams-{m.name}", max_length=16, include_lm_head=True)
        grams.append(root / f"grams-{m.name}")
    return {"implicit": implicit, "explicit": explicit}, grams


def expected_embeddings(case: str, a: torch.Tensor, b: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    method, options, _ = CASES[case]
    if method in ("average", "regmean"):  # embeddings are no Linear with grams: averaged
        return (a + b) / 2
    if method == "task_arithmetic":
        return base + options.scaling * ((a - base) + (b - base))
    return get_method("ties")(options).merge(EMBED, [a, b], base=base)


@pytest.mark.parametrize("stored", ["implicit", "explicit"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_tied_embeddings_stay_tied_equal_and_merged(tied, tmp_path, case, stored):
    from transformers import AutoModelForCausalLM

    models, grams = tied
    a, b, base = models[stored]
    method, options, lm_head = CASES[case]
    config = merge_models([a, b], get_method(method)(options), tmp_path / "out", grams=grams, base=base, lm_head=lm_head)
    assert config["lm_head_solved"] is False
    if method == "regmean":
        assert config["solved_modules"] == 14  # 7 Linears in each of 2 blocks, lm_head not among them
    out = state(tmp_path / "out")
    sa, sb, sbase = state(a), state(b), state(base)
    expected = expected_embeddings(case, sa[EMBED], sb[EMBED], sbase[EMBED])
    assert not torch.allclose(sa[EMBED], sb[EMBED]) and not torch.allclose(expected, sa[EMBED])
    torch.testing.assert_close(out[EMBED], expected, rtol=1e-6, atol=1e-6)
    if stored == "explicit":  # both copies written, and written equal
        assert torch.equal(out[HEAD], out[EMBED])
    else:
        assert HEAD not in out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert merged.config.tie_word_embeddings is True
    assert torch.equal(merged.get_output_embeddings().weight, merged.get_input_embeddings().weight)
    torch.testing.assert_close(merged.get_input_embeddings().weight.detach(), expected, rtol=1e-6, atol=1e-6)
