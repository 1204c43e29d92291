"""Synthetic Llama-architecture experts and grams for the merge benchmarks.

Random weights (streamed to 2+ safetensors shards tensor by tensor, so generating an 8B-shaped
layer never needs the whole model in memory) and random positive-definite grams in mergeflow's
format (`X^T X + ridge`, one key shared by q/k/v and by gate/up, as `mergeflow grams` writes them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergeflow.model_files import ShardedWriter, TensorSpec
from mergeflow.grams.format import FORMAT, file_for


@dataclass(frozen=True)
class Shape:
    """The sizes of a synthetic Llama (mergeflow.plan.Shape reads real configs; this one is written by hand)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    dtype: str

    @property
    def linears(self) -> list[tuple[str, int, int]]:
        """(name, in, out) of one layer's Linears."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h), ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]


CASES = {
    # ~1.5 GB per expert in float32, ~1.4 GB of grams per expert
    "small": Shape(hidden=2048, intermediate=5632, layers=8, heads=16, kv_heads=4, head_dim=128, vocab=8000, tied=False, dtype="float32"),
    # SmolLM2-135M's shapes (30 layers; lm_head untied here): ~0.65 GB per model, ~0.36 GB of grams per expert
    "smollm2-shapes": Shape(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, head_dim=64, vocab=49152, tied=False, dtype="float32"),
    # Llama-3-8B's real layer shapes, 2 layers: what one layer of a full merge needs
    "llama3-shapes": Shape(hidden=4096, intermediate=14336, layers=2, heads=32, kv_heads=8, head_dim=128, vocab=128256, tied=False, dtype="float32"),
}

ATTENTION, MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")


def specs(s: Shape) -> list[TensorSpec]:
    """Every tensor of an untied float32 Llama of shape `s`, in checkpoint order."""
    f32 = torch.float32
    out = [TensorSpec("model.embed_tokens.weight", (s.vocab, s.hidden), f32)]
    for i in range(s.layers):
        p = f"model.layers.{i}"
        linears = {name: TensorSpec(f"{p}.{'mlp' if name in MLP else 'self_attn'}.{name}.weight", (n_out, n_in), f32) for name, n_in, n_out in s.linears}
        out += [TensorSpec(f"{p}.input_layernorm.weight", (s.hidden,), f32), *(linears[n] for n in ATTENTION)]
        out += [TensorSpec(f"{p}.post_attention_layernorm.weight", (s.hidden,), f32), *(linears[n] for n in MLP)]
    return out + [TensorSpec("model.norm.weight", (s.hidden,), f32), TensorSpec("lm_head.weight", (s.vocab, s.hidden), f32)]


def make_expert(out: Path, s: Shape, seed: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    all_specs = specs(s)
    total = sum(sp.nbytes for sp in all_specs)
    writer = ShardedWriter(out, all_specs, max_shard_size=total // 2 + 1)
    gen = torch.Generator().manual_seed(seed)
    for sp in all_specs:
        rows = max(1, 2**24 // (sp.shape[-1] if len(sp.shape) > 1 else 1))
        for start in range(0, sp.shape[0], rows):
            block_shape = (min(rows, sp.shape[0] - start), *sp.shape[1:])
            writer.write(sp.name, torch.randn(block_shape, generator=gen) * 0.02 + (1.0 if "norm" in sp.name else 0.0))
    writer.close()
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s.hidden, "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers, "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads, "vocab_size": s.vocab,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))


def make_grams(out: Path, s: Shape, seed: int, lm_head: bool) -> None:
    """Random SPD grams `X^T X + d I` (X of 256 rows) as token sums over 1000 tokens."""
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    modules: dict[str, dict] = {}
    files: dict[str, dict[str, torch.Tensor]] = {}

    def add(key: str, dim: int, names: list[str]) -> None:
        x = torch.randn(256, dim, generator=gen)
        g = x.T @ x
        g.diagonal().add_(float(dim))
        files.setdefault(file_for(key), {})[key] = g
        for n in names:
            modules[n] = {"file": file_for(key), "key": key}

    for i in range(s.layers):
        p = f"model.layers.{i}"
        add(f"{p}.self_attn.q_proj", s.hidden, [f"{p}.self_attn.{x}_proj" for x in "qkv"])
        add(f"{p}.self_attn.o_proj", s.hidden, [f"{p}.self_attn.o_proj"])
        add(f"{p}.mlp.gate_proj", s.hidden, [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"])
        add(f"{p}.mlp.down_proj", s.intermediate, [f"{p}.mlp.down_proj"])
        for file in list(files):  # write each layer's file as soon as it is complete
            save_file(files.pop(file), str(out / file))
    if lm_head:
        add("lm_head", s.hidden, ["lm_head"])
        save_file(files.pop("other.safetensors"), str(out / "other.safetensors"))
    index = {"format": FORMAT, "num_tokens": 1000, "model": f"synthetic-{seed}", "dtype": "float32", "modules": modules}
    (out / "grams.json").write_text(json.dumps(index, indent=2))


def ensure_case(root: Path, case: str, lm_head: bool) -> dict[str, list[Path]]:
    """Create (once) the case's two experts, a base and their grams under `root/case`."""
    s, base = CASES[case], root / case
    paths = {"experts": [base / "expert0", base / "expert1"], "grams": [base / "grams0", base / "grams1"], "base": [base / "base"]}
    for i, (e, g) in enumerate(zip(paths["experts"], paths["grams"])):
        if not (e / "config.json").is_file():
            make_expert(e, s, seed=i)
        if not (g / "grams.json").is_file():
            make_grams(g, s, seed=100 + i, lm_head=lm_head)
    return paths
