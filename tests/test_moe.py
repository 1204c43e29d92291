"""Mixture-of-experts models as transformers 5 writes them (Mixtral, Qwen2-MoE: routers that are
not nn.Linear, experts fused in 3-D parameters in memory, one tensor per expert on disk): grams with
padding against a direct float64 computation (each expert's from the very inputs the eager forward
feeds it), RegMean against its closed form on every solved module (routers and every expert
included), fused experts of another layout averaged with a warning naming them, the merged model
loading."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from helpers import state
from mergeflow.grams import GramDir
from mergeflow.grams.collect import compute_grams
from mergeflow.params import GramParams
from mergeflow.grams.moe import expert_slots, fused_expert_warning
from mergeflow.merge import merge_models
from mergeflow.methods import get_method
from mergeflow.models import load_model
from seq2seq_helpers import byte_level_tokenizer
from test_merge import closed_form

TEXTS = ["the quick brown fox", "Anna went to the shop because she needed milk.", "2 + 2 = 4", "no", "the lazy dog sleeps all day long"]
SMALL = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": False}
FAMILIES = {
    "mixtral": (MixtralForCausalLM, lambda: MixtralConfig(**SMALL, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2), 2 * (5 + 4 * 3),
                "block_sparse_moe", ("w1", "w3", "w2")),
    "qwen2_moe": (Qwen2MoeForCausalLM, lambda: Qwen2MoeConfig(**SMALL, moe_intermediate_size=24, shared_expert_intermediate_size=24, num_experts=4,
                                                             num_experts_per_tok=2, decoder_sparse_step=1), 2 * (9 + 4 * 3),
                  "mlp", ("gate_proj", "up_proj", "down_proj")),
}  # solved per layer: q, k, v, o, the router (+ Qwen2-MoE's shared expert gate/up/down and its gate) and 4 experts x (gate, up, down);
# where the MoE block is saved; the saved names of an expert's gate, up and down


def make_moe(path, family: str, seed: int):
    cls, config, *_ = FAMILIES[family]
    torch.manual_seed(seed)
    tok = byte_level_tokenizer()
    tok.padding_side = "left"
    config = config()
    config.vocab_size, config.pad_token_id, config.eos_token_id = len(tok), tok.pad_token_id, tok.eos_token_id
    model = cls(config)
    with torch.no_grad():  # routers and experts start at zero or constants: random, so routing and averaging are real
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def moe(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    experts = [make_moe(root / f"e{i}", family, seed=20 + i) for i in range(2)]
    data = root / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    grams = [root / f"g{i}" for i in range(2)]
    for expert, out in zip(experts, grams):
        compute_grams(expert, data, out, GramParams(max_length=16, batch_size=2, dtype="float64"))
    return family, experts, grams, make_moe(root / "base", family, seed=9)


def solved_modules(model) -> dict[str, torch.nn.Module]:
    """Independently of mergeflow's discovery: block Linears and the routers."""
    return {n: m for n, m in model.named_modules() if ".layers." in n and (isinstance(m, torch.nn.Linear) or type(m).__name__.endswith("Router"))}


def direct_grams(model_dir, family, monkeypatch):
    """Named as saved (Mixtral's router `mlp.gate` is saved as `block_sparse_moe.gate`); each expert's
    inputs caught where the eager forward multiplies them by a slice of `gate_up_proj` or `down_proj`."""
    model, tok = load_model(model_dir)
    model.set_experts_implementation("eager")  # the grouped-GEMM kernel takes no float64
    model.double()
    block, (gate, up, down) = FAMILIES[family][3:]
    sums: dict[str, torch.Tensor] = {}

    def add(name, x):
        x = x.reshape(-1, x.shape[-1])
        sums[name] = sums.get(name, 0) + x.T @ x

    hooks = [module.register_forward_pre_hook(lambda mod, args, name=name: add(name, args[0])) for name, module in solved_modules(model).items()]
    fused = {}
    for layer, decoder_layer in enumerate(model.model.layers):
        experts, prefix = decoder_layer.mlp.experts, f"model.layers.{layer}.{block}.experts"
        fused[experts.gate_up_proj.data_ptr()] = (experts.gate_up_proj, lambda e, prefix=prefix: [f"{prefix}.{e}.{gate}", f"{prefix}.{e}.{up}"])
        fused[experts.down_proj.data_ptr()] = (experts.down_proj, lambda e, prefix=prefix: [f"{prefix}.{e}.{down}"])
    linear = torch.nn.functional.linear

    def spying_linear(x, weight, bias=None):
        for start, (param, names) in fused.items():
            offset = weight.data_ptr() - start
            if 0 <= offset < param.numel() * param.element_size() and weight.dim() == 2:
                for name in names(offset // (param.stride(0) * param.element_size())):
                    add(name, x)
        return linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", spying_linear)
    with torch.no_grad():
        for text in TEXTS:
            model(**tok(text, truncation=True, max_length=16, return_tensors="pt"), use_cache=False)
    monkeypatch.undo()
    for h in hooks:
        h.remove()
    return {name.replace(".mlp.gate", f".{block}.gate"): value for name, value in sums.items()}


def test_moe_grams_equal_direct_computation_with_padding(moe, monkeypatch):
    family, experts, grams, _ = moe
    expected = direct_grams(experts[0], family, monkeypatch)
    g = GramDir.open(grams[0])
    assert set(g.modules) == set(expected) and len(expected) == FAMILIES[family][2]
    assert {f"model.layers.{i}.{FAMILIES[family][3]}.gate" for i in range(2)} <= set(g.modules)
    for module, value in expected.items():
        torch.testing.assert_close(g.load(module), value, rtol=1e-5, atol=1e-5, msg=lambda m: f"{module}: {m}")


def test_moe_regmean_solves_routers_averages_fused_experts_and_loads(moe, tmp_path):
    family, experts, grams, _ = moe
    alpha = 0.5
    merge_models(experts, get_method("regmean")({"alpha": alpha, "solver_dtype": "float64"}), tmp_path / "rm", grams=grams)
    merged, expert_states = state(tmp_path / "rm"), [state(e) for e in experts]
    gdirs = [GramDir.open(g) for g in grams]
    solved = 0
    for name, tensor in merged.items():
        module = name.removesuffix(".weight")
        weights = [s[name].double() for s in expert_states]
        if name.endswith(".weight") and module in gdirs[0].modules:
            expected = closed_form(weights, [g.load(module) / g.num_tokens for g in gdirs], alpha)
            solved += 1
        else:  # embeddings, norms, biases, lm_head: averaged
            expected = sum(weights) / len(weights)
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert solved == FAMILIES[family][2]
    assert f"model.layers.1.{FAMILIES[family][3]}.experts.3.{FAMILIES[family][4][2]}.weight" in merged  # saved one tensor per expert
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "rm")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(logits).all()


def test_fused_experts_of_another_layout_are_named_in_a_warning(moe):
    family, experts, *_ = moe
    model, _ = load_model(experts[0])
    slots, unsolved = expert_slots(model)
    assert len(slots) == 2 * 4 * 3 and not unsolved
    model.model.layers[1].mlp.experts.is_transposed = True  # a layout whose inputs are not recomputed
    slots, unsolved = expert_slots(model)
    assert len(slots) == 4 * 3
    block, (gate, _, down) = FAMILIES[family][3:]
    assert fused_expert_warning(unsolved) == (
        "fused mixture-of-experts weights get no grams and are averaged by every method (RegMean solves the routers): "
        f"model.layers.{{1}}.mlp.experts.down_proj, model.layers.{{1}}.mlp.experts.gate_up_proj (saved as 12 tensors: model.layers.1.{block}.experts.0.{min(gate, down)}.weight, ...)")


@pytest.mark.parametrize("method", ["average", "task_arithmetic", "ties"])
def test_other_methods_merge_moe(moe, tmp_path, method):
    family, experts, _, base = moe
    merge_models(experts, get_method(method)(), tmp_path / method, base=base if method != "average" else None)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / method)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


def test_moe_grams_in_layer_groups_equal_one_pass(moe, tmp_path, caplog):
    """`max_gram_memory` splits the layers into passes that stop after their last module, an experts block included."""
    family, experts, grams, _ = moe
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    with caplog.at_level(logging.INFO, logger="mergeflow.grams.collect"):  # about 32 and 37 KB of float64 grams per layer
        compute_grams(experts[0], data, tmp_path / "g", GramParams(max_length=16, batch_size=2, dtype="float64", max_gram_memory="40KB"))
    assert ", 2 pass(es) -> " in caplog.text
    whole, parts = GramDir.open(grams[0]), GramDir.open(tmp_path / "g")
    assert parts.modules == whole.modules
    for module in whole.modules:
        torch.testing.assert_close(parts.load(module), whole.load(module), rtol=1e-12, atol=1e-12)
