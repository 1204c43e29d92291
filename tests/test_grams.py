"""Grams against a direct float64 computation, the on-disk format, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import input_grams

from mergeflow.grams import FORMAT, GramDir
from mergeflow.grams.collect import compute_grams
from mergeflow.grams.data import load_rows as read_texts
from mergeflow.grams.modules import discover
from mergeflow.params import GramParams
from mergeflow.models import load_model


def direct_grams(model_dir, texts, max_length):
    """One unpadded text at a time, float64: sum of x x^T of every block Linear's input."""
    model, tok = load_model(model_dir)
    model.double()
    tokens = 0
    with input_grams(discover(model).linears()) as sums, torch.no_grad():
        for text in texts:
            ids = tok(text, truncation=True, max_length=max_length, return_tensors="pt")
            model(**ids)
            tokens += ids["input_ids"].numel()
    return sums, tokens


def test_grams_equal_direct_computation_with_padding(experts, calib_file, gram_dirs):
    texts = read_texts(calib_file)
    expected, tokens = direct_grams(experts[0], texts, max_length=16)
    grams = GramDir.open(gram_dirs[0])
    assert grams.num_tokens == tokens
    assert set(grams.modules) == set(expected)
    for module, value in expected.items():
        torch.testing.assert_close(grams.load(module).double(), value, rtol=1e-5, atol=1e-5, msg=lambda m: f"{module}: {m}")


def test_modules_with_one_input_share_one_key(gram_dirs):
    meta = json.loads((gram_dirs[0] / "grams.json").read_text())
    assert meta["format"] == FORMAT
    mods = meta["modules"]
    for layer in range(2):
        p = f"model.layers.{layer}"
        q, k, v = (mods[f"{p}.self_attn.{x}_proj"] for x in "qkv")
        assert q == k == v == {"file": f"layer_{layer:03d}.safetensors", "key": f"{p}.self_attn.q_proj"}
        assert mods[f"{p}.mlp.gate_proj"] == mods[f"{p}.mlp.up_proj"]
        assert mods[f"{p}.self_attn.o_proj"]["key"] == f"{p}.self_attn.o_proj"
        assert mods[f"{p}.mlp.down_proj"]["key"] == f"{p}.mlp.down_proj"
    assert sorted(p.name for p in gram_dirs[0].iterdir()) == ["grams.json", "layer_000.safetensors", "layer_001.safetensors"]


def test_grams_are_float32_sums_of_right_shape(gram_dirs):
    g = GramDir.open(gram_dirs[0])
    q = g.load("model.layers.0.self_attn.q_proj")
    down = g.load("model.layers.0.mlp.down_proj")
    assert q.dtype == torch.float32 and q.shape == (16, 16) and down.shape == (24, 24)
    torch.testing.assert_close(q, q.T)
    assert torch.linalg.eigvalsh(q.double()).min() > -1e-6  # a sum of outer products


def test_num_samples_and_max_length_limit_the_tokens(experts, calib_file, tmp_path):
    n = compute_grams(experts[0], calib_file, tmp_path / "g", GramParams(max_length=4, num_samples=3))
    assert n == sum(min(4, len(t)) for t in read_texts(calib_file)[:3])


def test_missing_data_file_is_a_clear_error(experts, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl: calibration data file not found"):
        compute_grams(experts[0], tmp_path / "nope.jsonl", tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_rows_without_text_field_are_a_clear_error(experts, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"rows have no 'text' field \(fields: \['prompt'\]\)"):
        compute_grams(experts[0], data, tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_empty_data_file_is_a_clear_error(experts, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("")
    with pytest.raises(ValueError, match=r"d\.jsonl: is empty; grams need calibration text"):
        compute_grams(experts[0], data, tmp_path / "g")


def test_text_is_read_verbatim_and_missing_values_refused(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "007"}\n{"text": "1.50"}\n')
    assert read_texts(data) == ["007", "1.50"]
    data.write_text('{"text": "a"}\n{"other": "b"}\n')
    with pytest.raises(ValueError, match=r"rows \[2\] \(of the selection\) have no 'text' value"):
        read_texts(data)


def test_corrupt_gram_file_is_a_clear_error(gram_dirs, tmp_path):
    import shutil

    bad = tmp_path / "g"
    shutil.copytree(gram_dirs[0], bad)
    (bad / "layer_000.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"layer_000\.safetensors: 22 bytes, but .* records \d+; the file is truncated or corrupt"):
        GramDir.open(bad)
    meta = json.loads((bad / "grams.json").read_text())
    del meta["files"]  # written before integrity records: the safetensors reader still refuses it
    (bad / "grams.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"layer_000\.safetensors: not a readable safetensors file"):
        GramDir.open(bad)


def test_outputs_follow_the_umask(gram_dirs):
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(gram_dirs[0]).st_mode) == 0o777 & ~mask
    assert stat.S_IMODE(os.stat(gram_dirs[0] / "grams.json").st_mode) == 0o666 & ~mask
