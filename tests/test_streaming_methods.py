"""The streaming protocol (methods/base.py, methods/streaming.py): every data-free method merged in
tiny row blocks (STREAM_BYTES forced down, so each 2-D tensor of a tiny Llama is cut into many
blocks) gives what it gives on whole tensors: the same bytes where the method is elementwise or
ranks and masks entries (the ranks are exact over the whole tensor, the random masks drawn as one
draw), equal to float rounding where it reduces the tensor to a number (norms, angles, L1 rescale:
float64 sums over other blocks)."""

from __future__ import annotations

import pytest
import torch

from mergeflow import merge
from mergeflow.merge import merge_models
from mergeflow.methods import MergeMethod, get_method
from mergeflow.methods.streaming import Statistics, gather
from mergeflow.model_files import STREAM_BYTES, TensorSpec

from helpers import make_tiny_llama, state

# case -> (method, values, exact): three experts unless the method takes two
CASES = {
    "task_arithmetic": ("task_arithmetic", {"scaling": 0.7, "weights": [0.5, 1.0, 0.8]}, True),
    "ties": ("ties", {"density": 0.3, "weights": [0.7, 1.3, 0.5]}, True),
    "ties-mergekit": ("ties", {"density": 0.3, "convention": "mergekit", "weights": [0.7, 1.3, 0.5]}, True),
    "dare_linear": ("dare_linear", {"density": 0.4, "rescale": False, "seed": 3}, True),
    "dare_ties-rescaled": ("dare_ties", {"density": 0.4, "seed": 4}, False),
    "della": ("della", {"density": 0.5, "epsilon": 0.2, "rescale": False}, True),
    "della_linear-rescaled": ("della_linear", {"density": 0.5, "epsilon": 0.2}, False),
    "breadcrumbs": ("breadcrumbs", {"density": 0.5, "gamma": 0.1}, True),
    "breadcrumbs_ties-rescaled": ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.1, "rescale": True}, False),
    "sce": ("sce", {"select_topk": 0.5}, False),
    "slerp": ("slerp", {"t": 0.3}, False),
    "nuslerp": ("nuslerp", {"weights": [1.0, 3.0], "use_base": True}, False),
    "nuslerp-columns": ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}, False),
    "nuslerp-rows": ("nuslerp", {"nuslerp_flatten": False}, True),
    "model_stock": ("model_stock", {}, False),
    "karcher": ("karcher", {"weights": [0.2, 0.3, 0.5]}, False),
}
TWO_EXPERTS = {"slerp", "nuslerp"}


@pytest.fixture(scope="module")
def models(experts, tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    return {"base": make_tiny_llama(root / "base", seed=30), "experts": [*experts, make_tiny_llama(root / "e2", seed=31)]}


def count_blocks(monkeypatch) -> dict[str, int]:
    """tensor name -> how many row blocks the engine cut it into (in the next merge)."""
    seen: dict[str, int] = {}
    real = merge.stream_blocks

    def spy(spec, method, inputs):
        blocks = real(spec, method, inputs)
        seen[spec.name] = len(blocks)
        return blocks

    monkeypatch.setattr(merge, "stream_blocks", spy)
    return seen


@pytest.mark.parametrize("case", CASES)
def test_streamed_in_tiny_blocks_equals_whole_tensors(models, tmp_path, monkeypatch, case):
    method, values, exact = CASES[case]
    experts = models["experts"][:2] if method in TWO_EXPERTS else models["experts"]
    merge_models(experts, get_method(method)(values), tmp_path / "whole", base=models["base"])
    blocks = count_blocks(monkeypatch)
    monkeypatch.setattr(merge, "STREAM_BYTES", 2048)
    merge_models(experts, get_method(method)(values), tmp_path / "blocks", base=models["base"])
    assert blocks["model.embed_tokens.weight"] > 10 and blocks["model.norm.weight"] == 1
    whole, streamed = state(tmp_path / "whole"), state(tmp_path / "blocks")
    for name in whole:
        if exact:
            assert torch.equal(streamed[name], whole[name]), name
        else:
            torch.testing.assert_close(streamed[name], whole[name], rtol=2e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_methods_without_the_protocol_keep_their_blocks(experts, tmp_path, monkeypatch):
    """average (and RegMean, any plugin) declares no block_copies: whole tensors below BLOCK_BYTES,
    whatever STREAM_BYTES, so their outputs stay the bytes they were."""
    blocks = count_blocks(monkeypatch)
    monkeypatch.setattr(merge, "STREAM_BYTES", 2048)
    merge_models(experts, get_method("average")(), tmp_path / "avg")
    assert set(blocks.values()) == {1}


class Total(Statistics):
    """The sum and count of the first expert's entries, over every block."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def observe(self, step, tensors, base):
        self.total += float(tensors[0].double().sum())
        self.count += tensors[0].numel()


class Centred(MergeMethod):
    """A plugin using the protocol: the first expert minus its whole tensor's mean."""

    name = "centred"

    def block_copies(self, inputs):
        return inputs + 2

    def statistics(self, name, shape):
        return Total()

    def merge(self, name, tensors, *, grams=None, base=None, stats=None):
        stats = stats or gather(Total(), tensors, base)
        return tensors[0].to(torch.float32) - stats.total / stats.count


def test_a_plugin_gets_statistics_of_the_whole_tensor_in_blocks(experts, tmp_path, monkeypatch):
    """The plugin's blocks are centred by the mean of the whole tensor, not of their own rows."""
    blocks = count_blocks(monkeypatch)
    monkeypatch.setattr(merge, "STREAM_BYTES", 1024)
    merge_models(experts, Centred(), tmp_path / "out")
    assert blocks["model.embed_tokens.weight"] > 10
    merged, first = state(tmp_path / "out"), state(experts[0])
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, first[name] - first[name].double().mean().float(), rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_stream_blocks_fit_the_working_set():
    """SmolLM2's embedding (49152 x 576) under ties with two experts and a base (12 block copies):
    consecutive blocks of the most rows whose 12 float32 copies fit STREAM_BYTES; average keeps
    the whole tensor (108 MiB < BLOCK_BYTES), as before the protocol."""
    spec = TensorSpec("model.embed_tokens.weight", (49152, 576), torch.bfloat16)
    ties = get_method("ties")()
    blocks = merge.stream_blocks(spec, ties, 3)
    row_bytes = 576 * 4 * ties.block_copies(3)
    rows = blocks[0].stop
    assert ties.block_copies(3) == 12 and rows * row_bytes <= STREAM_BYTES < (rows + 1) * row_bytes
    assert [(b.start, b.stop) for b in blocks] == [(s, min(s + rows, 49152)) for s in range(0, 49152, rows)]
    assert merge.stream_blocks(spec, get_method("average")(), 2) == [None]
