"""Every decoder family end to end on tiny random models built here: discovery of the solved
modules, float64 grams against a direct computation with padding, RegMean against a float64 closed
form on every solved module (Conv1D the right way round), the merged model loading in transformers,
and the other methods running. One module-scoped model zoo per family keeps the file fast."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers as T

from mergeflow.grams import GramDir
from mergeflow.grams.collect import compute_grams
from mergeflow.grams.data import load_rows
from mergeflow.grams.modules import discover
from mergeflow.merge import merge_models
from mergeflow.methods import get_method
from mergeflow.models import load_model
from mergeflow.params import GramParams
from mergeflow.zoo.tokenizer import build_tokenizer

from helpers import state

H, I, L, HEADS = 16, 24, 2, 4
ATTN = dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS)
DECODERS = {
    "llama": lambda: T.LlamaConfig(**ATTN, intermediate_size=I, num_key_value_heads=2),
    "mistral": lambda: T.MistralConfig(**ATTN, intermediate_size=I, num_key_value_heads=2),
    "qwen2": lambda: T.Qwen2Config(**ATTN, intermediate_size=I, num_key_value_heads=2),  # q/k/v biases
    "qwen3": lambda: T.Qwen3Config(**ATTN, intermediate_size=I, num_key_value_heads=2, head_dim=8),
    "gemma2": lambda: T.Gemma2Config(**ATTN, intermediate_size=I, num_key_value_heads=2, head_dim=8),
    "phi3": lambda: T.Phi3Config(**ATTN, intermediate_size=I, num_key_value_heads=2),  # fused qkv_proj, gate_up_proj
    "gpt_neox": lambda: T.GPTNeoXConfig(**ATTN, intermediate_size=I),  # lm_head saved as embed_out
    "opt": lambda: T.OPTConfig(**ATTN, ffn_dim=I, word_embed_proj_dim=H),
    "gpt2": lambda: T.GPT2Config(n_embd=H, n_layer=L, n_head=HEADS, n_positions=64),  # Conv1D [in, out]
    "falcon": lambda: T.FalconConfig(**ATTN),  # FalconLinear, multi-query
    "bloom": lambda: T.BloomConfig(hidden_size=H, n_layer=L, n_head=HEADS),
}
# what discovery must find in every block (per block; `*` fused or Conv1D), as a sanity check of the families
SOLVED_PER_BLOCK = {"llama": 7, "mistral": 7, "qwen2": 7, "qwen3": 7, "gemma2": 7, "phi3": 4, "gpt_neox": 4, "opt": 6, "gpt2": 4, "falcon": 4, "bloom": 4}
TEXTS = ["12+5=17", "rev(abc)=cba", "cp(x)=x", "9+9=18 and more text here", "a", "hello world 123", "rev(hgfedcba)=abcdefgh"]


def build(family: str, path, seed: int):
    tok = build_tokenizer(64)
    config = DECODERS[family]()
    config.update(dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, max_position_embeddings=64))
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random biases and norms too, so that averaging them (or solving biases) is a real test
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name or "ln" in name else p.normal_(0, 0.3)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@dataclass
class Zoo:
    family: str
    experts: list[Path]
    base: Path
    grams: list[Path]
    rows: list[dict[str, torch.Tensor]]  # per expert: module -> its input rows, float64


@pytest.fixture(scope="module", params=sorted(DECODERS))
def zoo(request, tmp_path_factory) -> Zoo:
    """Two experts and a base of one family, the experts' float64 grams, and their inputs recorded with hooks."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    data = root / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    experts = [build(family, root / f"e{i}", i) for i in range(2)]
    grams = [root / f"g{i}" for i in range(2)]
    for expert, out in zip(experts, grams):
        compute_grams(expert, data, out, GramParams(max_length=16, batch_size=3, dtype="float64"))
    return Zoo(family, experts, build(family, root / "base", 7), grams, [inputs_of(e, data) for e in experts])


def inputs_of(expert: Path, data: Path) -> dict[str, torch.Tensor]:
    """Every solved module's input rows, one unpadded text at a time (so no padding to leave out),
    from the float32 forward the grams saw, as float64: only padding and batching could differ."""
    model, tok = load_model(expert)
    rows: dict[str, list] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: rows.setdefault(n, []).append(args[0].reshape(-1, args[0].shape[-1])))
             for n, m in discover(model).linears().items()]
    with torch.no_grad():
        for text in load_rows(data):
            model(**tok(text, truncation=True, max_length=16, return_tensors="pt"))
    for h in hooks:
        h.remove()
    return {n: torch.cat(r).double() for n, r in rows.items()}


def test_discovery_finds_every_block_linear(zoo):
    model, _ = load_model(zoo.experts[0])
    modules = discover(model)
    assert len(modules.solved) == L * SOLVED_PER_BLOCK[zoo.family]
    assert all(m.transposed == (zoo.family == "gpt2") for m in modules.solved.values())
    assert len(modules.containers) == 1


def test_float64_grams_equal_a_direct_computation_with_padding(zoo):
    model, _ = load_model(zoo.experts[0])
    modules = discover(model)
    g = GramDir.open(zoo.grams[0])
    assert set(g.modules) == set(zoo.rows[0]) == set(modules.solved)
    assert g.num_tokens == len(next(iter(zoo.rows[0].values())))
    for name, x in zoo.rows[0].items():
        ref = g.modules[name]
        torch.testing.assert_close(g.load(name), x.T @ x, rtol=1e-5, atol=1e-6 * float((x.T @ x).abs().max()), msg=lambda m: f"{name}: {m}")
        assert ref.transposed == modules.solved[name].transposed
        shares_with_bias = any(modules.solved[m].bias for m, r in g.modules.items() if r.key == ref.key)
        assert (ref.input_sum is not None) == shares_with_bias
        if shares_with_bias:  # kept for a least-squares bias
            mean = g.load_mean_augmented(name, torch.float64)
            torch.testing.assert_close(mean[:-1, -1] * g.num_tokens, x.sum(0), rtol=1e-5, atol=1e-6 * float(x.abs().max()))
            assert float(mean[-1, -1]) == 1.0
    assert g.format == ("mergeflow.grams/2" if any(m.bias or m.transposed for m in modules.solved.values()) else "mergeflow.grams/1")


def closed_form(weights: list[torch.Tensor], grams: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """sum_i G~_i W^T = sum_i G~_i W_i^T; where the sum is singular (OPT's ReLU units that never
    fire), the minimum-norm change from the average, as RegMean's least-squares fallback."""
    shrunk = [alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g)) for g in grams]
    mean = sum(weights) / len(weights)
    return mean + (torch.linalg.pinv(sum(shrunk), hermitian=True) @ sum(s @ (w - mean).T for s, w in zip(shrunk, weights))).T


def test_regmean_equals_the_float64_closed_form_on_every_solved_module(zoo, tmp_path):
    options = {"alpha": 0.7, "solver_dtype": "float64"}
    merge_models(zoo.experts, get_method("regmean")(options), tmp_path / "rm", grams=zoo.grams)
    merged, inputs = state(tmp_path / "rm"), [state(e) for e in zoo.experts]
    dirs = [GramDir.open(g) for g in zoo.grams]
    for name, ref in dirs[0].modules.items():
        stored = [s[f"{name}.weight"].double() for s in inputs]
        expected = closed_form([w.T if ref.transposed else w for w in stored], [d.load_mean(name, torch.float64) for d in dirs], 0.7)
        got = merged[f"{name}.weight"].double()
        torch.testing.assert_close(got.T if ref.transposed else got, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{zoo.family} {name}: {m}")
        if f"{name}.bias" in merged:  # averaged by default
            torch.testing.assert_close(merged[f"{name}.bias"], (inputs[0][f"{name}.bias"] + inputs[1][f"{name}.bias"]) / 2)
    logits = T.AutoModelForCausalLM.from_pretrained(tmp_path / "rm")(torch.tensor([[1, 5, 9, 4]])).logits
    assert logits.shape[-1] == len(build_tokenizer(64)) and torch.isfinite(logits).all()


@pytest.mark.parametrize("method", ["average", "task_arithmetic", "ties"])
def test_other_methods_run_and_load(zoo, tmp_path, method):
    merge_models(zoo.experts, get_method(method).from_params({"scaling": 0.5, "density": 0.5}), tmp_path / method, base=zoo.base)
    merged, inputs, b = state(tmp_path / method), [state(e) for e in zoo.experts], state(zoo.base)
    for name in merged:
        if method == "average":
            torch.testing.assert_close(merged[name], (inputs[0][name] + inputs[1][name]) / 2)
        elif method == "task_arithmetic":
            torch.testing.assert_close(merged[name], b[name] + 0.5 * ((inputs[0][name] - b[name]) + (inputs[1][name] - b[name])))
    logits = T.AutoModelForCausalLM.from_pretrained(tmp_path / method)(torch.tensor([[1, 5, 9, 4]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("zoo", ["bloom", "gpt2", "gpt_neox", "opt", "qwen2"], indirect=True)  # the families with biases
def test_regmean_bias_solve_is_the_least_squares_fit_with_a_bias_column(zoo, tmp_path):
    """alpha 1: [W b] minimises sum_i ||[X_i 1] ([W b] - [W_i b_i])^T||^2 / n_i: the float64 lstsq
    solution of the experts' recorded inputs stacked with a column of ones."""
    dirs = [GramDir.open(g) for g in zoo.grams]
    biased = [m for m, r in dirs[0].modules.items() if r.input_sum]
    assert biased
    options = {"alpha": 1.0, "solver_dtype": "float64", "regmean_bias": "solve"}
    merge_models(zoo.experts, get_method("regmean")(options), tmp_path / "rm", grams=zoo.grams)
    merged, inputs = state(tmp_path / "rm"), [state(e) for e in zoo.experts]
    for name in biased:
        t = dirs[0].modules[name].transposed
        if f"{name}.bias" not in merged:  # shares its input with a biased Linear, has none itself: plain RegMean
            continue
        augmented = [torch.cat([s[f"{name}.weight"].double().T if t else s[f"{name}.weight"].double(), s[f"{name}.bias"].double()[:, None]], 1) for s in inputs]
        mean = sum(augmented) / len(augmented)  # the minimum-norm change from it where the fit is not unique (dead ReLUs)
        rows, targets = [], []
        for x, a in zip(zoo.rows, augmented):
            z = torch.cat([x[name], torch.ones(len(x[name]), 1, dtype=torch.float64)], 1) / len(x[name]) ** 0.5
            rows.append(z)
            targets.append(z @ (a - mean).T)
        fit = mean + torch.linalg.lstsq(torch.cat(rows), torch.cat(targets), driver="gelsd").solution.T
        got = merged[f"{name}.weight"].double()
        torch.testing.assert_close(got.T if t else got, fit[:, :-1], rtol=1e-4, atol=1e-5, msg=lambda m: f"{zoo.family} {name}: {m}")
        torch.testing.assert_close(merged[f"{name}.bias"].double(), fit[:, -1], rtol=1e-4, atol=1e-5, msg=lambda m: f"{zoo.family} {name}.bias: {m}")


def test_plan_prices_every_family_from_its_config(zoo):
    """Parameters, solved Linears and gram bytes predicted from config.json alone equal the real ones."""
    from mergeflow.plan import Shape

    config = json.loads((zoo.experts[0] / "config.json").read_text())
    shape = Shape.from_config(config, "test")
    model, _ = load_model(zoo.experts[0])
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    assert len(shape.solved) == L * SOLVED_PER_BLOCK[zoo.family]
    g = GramDir.open(zoo.grams[0])
    distinct = {ref.key for ref in g.modules.values()}
    assert shape.gram_bytes(False, "float64") == sum(g.shape(k)[0] ** 2 * 8 for k in distinct)
    assert shape.forward_flops_per_token(16) > 2 * sum(i * o for i, o in shape.solved)


def test_list_modules_prints_what_is_solved_and_what_is_averaged(zoo):
    from click.testing import CliRunner

    from mergeflow.model_files import CheckpointReader
    from mergeflow.cli import main

    result = CliRunner().invoke(main, ["grams", "--list-modules", str(zoo.experts[0])])
    assert result.exit_code == 0, result.output
    solved, averaged = result.output.split("merged by the method's rule")
    modules = GramDir.open(zoo.grams[0]).modules
    assert all(f"  {m}  " in solved for m in modules)
    names = CheckpointReader(zoo.experts[0]).names()
    assert sorted(line.strip() for line in averaged.splitlines()[1:] if line.startswith("  ")) == sorted(n for n in names if n.removesuffix(".weight") not in modules or not n.endswith(".weight"))


def test_a_model_without_block_linears_is_refused_naming_its_module_types():
    model = torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.ModuleList([torch.nn.LayerNorm(4), torch.nn.LayerNorm(4)]), torch.nn.Linear(4, 8))
    with pytest.raises(ValueError, match=r"^toy: no nn\.Linear or Conv1D inside repeated blocks \(a ModuleList of identical layers\); its module types: "
                                         r"Embedding x1, LayerNorm x2, Linear x1, ModuleList x1, Sequential x1$"):
        discover(model, where="toy")


@pytest.mark.parametrize("zoo", ["gpt2"], indirect=True)
def test_slices_of_conv1d_grams_with_input_sums_add_up_to_the_whole(zoo, tmp_path):
    from mergeflow.grams.combine import sum_grams

    data = zoo.grams[0].parent / "calib.jsonl"
    config = GramParams(max_length=16, batch_size=3, dtype="float64")
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for i, part in enumerate(parts):
        compute_grams(zoo.experts[0], data, part, config, shard=f"{i}/2")
    total, whole = sum_grams(parts, tmp_path / "sum"), GramDir.open(zoo.grams[0])
    assert total.modules == whole.modules and total.format == whole.format == "mergeflow.grams/2" and total.num_tokens == whole.num_tokens
    for name in whole.modules:
        torch.testing.assert_close(total.load_mean_augmented(name, torch.float64), whole.load_mean_augmented(name, torch.float64), rtol=1e-5, atol=1e-6)  # other batches: float32 forward rounding


@pytest.mark.parametrize("zoo", ["qwen2"], indirect=True)
def test_format_1_grams_still_merge_and_bias_solve_asks_for_new_ones(zoo, tmp_path):
    """Grams of a biased model written before input sums existed (format 1): RegMean merges them as
    before; `regmean_bias: solve` is refused before anything is written, naming the fix."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(zoo.grams[1], old)
    meta = json.loads((old / "grams.json").read_text())
    meta["format"] = "mergeflow.grams/1"
    meta["modules"] = {m: {"file": r["file"], "key": r["key"]} for m, r in meta["modules"].items()}
    (old / "grams.json").write_text(json.dumps(meta))
    merge_models(zoo.experts, get_method("regmean")({"alpha": 0.5}), tmp_path / "rm", grams=[zoo.grams[0], old])
    solve = get_method("regmean")({"alpha": 0.5, "regmean_bias": "solve"})
    with pytest.raises(ValueError, match=rf"^{old}/grams\.json: no input sum for model\.layers\.0\.self_attn\.k_proj \(format 'mergeflow\.grams/1', written before "
                                         rf"input sums were kept\); solving biases needs grams from this mergeflow: `rm -rf {old} && mergeflow grams --model "):
        merge_models(zoo.experts, solve, tmp_path / "solved", grams=[zoo.grams[0], old])
    assert not (tmp_path / "solved").exists()


@pytest.mark.parametrize("zoo", ["gpt2"], indirect=True)
def test_imported_conv1d_grams_keep_their_orientation_and_layer_files(zoo, tmp_path):
    import pickle

    from mergeflow.grams.importer import import_grams

    g = GramDir.open(zoo.grams[0])
    (tmp_path / "gram.pkl").write_bytes(pickle.dumps({m: g.load_mean(m, torch.float32) for m in g.modules}))
    import_grams(tmp_path / "gram.pkl", zoo.experts[0], tmp_path / "imported")
    imported = GramDir.open(tmp_path / "imported")
    assert imported.format == "mergeflow.grams/2" and imported.reduction == "mean"
    assert {m: (r.file, r.transposed) for m, r in imported.modules.items()} == {m: (r.file, True) for m, r in g.modules.items()}
