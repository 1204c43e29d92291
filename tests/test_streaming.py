"""The streaming engine: identical to in-memory merging, lm_head and tied embeddings, bad inputs,
and a merge killed midway."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import make_tiny_llama, state
from mergeflow.checkpoint import CheckpointReader, ShardedWriter, TensorSpec
from mergeflow.grams.collect import compute_grams
from mergeflow.merge import merge_models
from mergeflow.methods import get_method

METHODS = {
    "average": {},
    "regmean": {"alpha": 0.3},
    "task_arithmetic": {"scaling": 0.7},
    "ties": {"density": 0.4},
}


def test_writer_round_trips_blocks_and_dtypes(tmp_path):
    tensors = {"a": torch.randn(5, 3), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(6, dtype=torch.int64).reshape(2, 3)}
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    writer = ShardedWriter(tmp_path, specs, max_shard_size=64)  # a | b c
    writer.write("a", tensors["a"][:2])
    writer.write("a", tensors["a"][2:])
    writer.write("b", tensors["b"])
    writer.write("c", tensors["c"])
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    loaded = {}
    for f in sorted(tmp_path.glob("model-*.safetensors")):
        loaded.update(load_file(f))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_writer_refuses_out_of_order_or_short_writes(tmp_path):
    writer = ShardedWriter(tmp_path, [TensorSpec("a", (2,), torch.float32), TensorSpec("b", (2,), torch.float32)])
    with pytest.raises(RuntimeError, match="expected a"):
        writer.write("b", torch.zeros(2))
    writer.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="closed before b"):
        writer.close()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_streaming_in_row_blocks_equals_whole_tensors(experts, gram_dirs, tmp_path, monkeypatch, method):
    m = lambda: get_method(method)(METHODS[method])  # noqa: E731
    merge_models(experts, m(), tmp_path / "whole", grams=gram_dirs, base=experts[1])
    monkeypatch.setattr("mergeflow.merge.BLOCK_BYTES", 256)
    merge_models(experts, m(), tmp_path / "blocks", grams=gram_dirs, base=experts[1], max_shard_size=10_000)
    whole, blocks = state(tmp_path / "whole"), state(tmp_path / "blocks")
    assert len(list((tmp_path / "blocks").glob("model-*.safetensors"))) > 1
    assert whole.keys() == blocks.keys()
    for name in whole:
        torch.testing.assert_close(blocks[name], whole[name], rtol=1e-6, atol=1e-7, msg=lambda msg: f"{name}: {msg}")


def test_regmean_on_lm_head_when_asked(experts, calib_file, tmp_path):
    grams = []
    for i, e in enumerate(experts):
        compute_grams(e, calib_file, tmp_path / f"g{i}", max_length=16, include_lm_head=True)
        grams.append(tmp_path / f"g{i}")
    plain = merge_models(experts, get_method("regmean")({"alpha": 0.5}), tmp_path / "plain", grams=grams)
    solved = merge_models(experts, get_method("regmean")({"alpha": 0.5}), tmp_path / "head", grams=grams, lm_head=True)
    assert (plain["lm_head_solved"], plain["solved_modules"]) == (False, 14)
    assert (solved["lm_head_solved"], solved["solved_modules"]) == (True, 15)
    a, b, head = state(experts[0]), state(experts[1]), state(tmp_path / "head")
    assert not torch.allclose(head["lm_head.weight"], (a["lm_head.weight"] + b["lm_head.weight"]) / 2, atol=1e-4)
    torch.testing.assert_close(state(tmp_path / "plain")["lm_head.weight"], (a["lm_head.weight"] + b["lm_head.weight"]) / 2)


def test_lm_head_without_its_grams_is_refused(experts, gram_dirs, tmp_path):
    with pytest.raises(ValueError, match=r"no gram for lm_head.*gram\.include_lm_head: true"):
        merge_models(experts, get_method("regmean")(), tmp_path / "out", grams=gram_dirs, lm_head=True)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tied(tmp_path_factory, calib_file):
    root = tmp_path_factory.mktemp("tied")
    models = [make_tiny_llama(root / f"t{i}", seed=10 + i, tie=True) for i in range(3)]
    grams = []
    for i, m in enumerate(models[:2]):
        compute_grams(m, calib_file, root / f"g{i}", max_length=16, include_lm_head=True)
        grams.append(root / f"g{i}")
    return models, grams


@pytest.mark.parametrize("method", sorted(METHODS))
def test_tied_embeddings_stay_tied_and_equal(tied, tmp_path, method):
    from transformers import AutoModelForCausalLM

    models, grams = tied
    config = merge_models(models[:2], get_method(method)(METHODS[method]), tmp_path / "out", grams=grams, base=models[2], lm_head=True)
    assert not config["lm_head_solved"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert merged.config.tie_word_embeddings
    assert torch.equal(merged.get_input_embeddings().weight, merged.get_output_embeddings().weight)
    assert "lm_head.weight" not in state(tmp_path / "out")


def test_non_finite_weight_is_refused_naming_tensor(experts, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(experts[1], bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"bad: model\.layers\.1\.mlp\.up_proj\.weight: holds NaN or infinite"):
        merge_models([experts[0], bad], get_method("average")(), tmp_path / "out")
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_non_finite_gram_is_refused_naming_file(experts, gram_dirs, tmp_path):
    bad = tmp_path / "g"
    shutil.copytree(gram_dirs[1], bad)
    tensors = load_file(bad / "layer_000.safetensors")
    key = "model.layers.0.mlp.down_proj"
    tensors[key][1, 1] = float("inf")
    save_file(tensors, str(bad / "layer_000.safetensors"), metadata={"format": "mergeflow.grams/1"})  # same size as recorded
    with pytest.raises(ValueError, match=r"layer_000\.safetensors \(gram of model\.layers\.0\.mlp\.down_proj\): holds NaN or infinite"):
        merge_models(experts, get_method("regmean")(), tmp_path / "out", grams=[gram_dirs[0], bad], verify_grams=False)
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors_is_refused_naming_file(experts, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(experts[1], bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"bad/model\.safetensors: not a readable safetensors file .*truncated or corrupt"):
        CheckpointReader(bad)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        merge_models([experts[0], bad], get_method("average")(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


KILLER = textwrap.dedent(
    '''
    import os, signal
    from mergeflow.methods.average import Average

    class DiesMidway(Average):
        name = "dies_midway"
        calls = 0

        def merge(self, name, tensors, **kw):
            DiesMidway.calls += 1
            if DiesMidway.calls == 10:
                os.kill(os.getpid(), signal.SIGKILL)
            return super().merge(name, tensors, **kw)
    '''
)


@pytest.mark.parametrize("previous", [False, True])
def test_merge_killed_midway_leaves_nothing_or_the_previous_model(experts, tmp_path, previous):
    (tmp_path / "killer.py").write_text(KILLER)
    out = tmp_path / "out"
    if previous:
        merge_models(experts, get_method("average")(), out)
        before = state(out)
    args = [sys.executable, "-m", "mergeflow", "merge", "--method", f"{tmp_path / 'killer.py'}:DiesMidway", "--model", str(experts[0]), "--model", str(experts[1]), "--out", str(out), "--force"]
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == -9
    if previous:
        after = state(out)
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
        assert json.loads((out / "mergeflow_merge.json").read_text())["method"] == "average"
    else:
        assert not out.exists()


def test_huge_finite_values_are_not_mistaken_for_inf():
    from mergeflow.merge import check_finite

    big = torch.full((1000,), 3e38)  # finite, but its float32 sum overflows
    assert check_finite(big, "big") is big
    big[500] = float("nan")
    with pytest.raises(ValueError, match="big: holds NaN or infinite"):
        check_finite(big, "big", chunk=64)
    mixed = torch.zeros(10)
    mixed[1], mixed[2] = float("inf"), -float("inf")  # sums to NaN, not to a finite number
    with pytest.raises(ValueError):
        check_finite(mixed, "mixed")


@pytest.mark.parametrize(("text", "size"), [("500MB", 500_000_000), ("5GiB", 5 * 2**30), ("1.5GB", 1_500_000_000), ("4096", 4096)])
def test_parse_size(text, size):
    from mergeflow.checkpoint import parse_size

    assert parse_size(text) == size


def test_parse_size_refuses_nonsense():
    from mergeflow.checkpoint import parse_size

    with pytest.raises(ValueError, match=r"'lots' is not a size such as 500MB.*merge\.max_shard_size"):
        parse_size("lots")
