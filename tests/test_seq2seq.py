"""Encoder-decoders (T5 laid out as Flan-T5): grams with two padding masks against a direct float64
computation, RegMean against its closed form on every solved module, the merged model loading."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from helpers import input_grams, state
from mergeflow.grams import GramDir
from mergeflow.grams.collect import compute_grams
from mergeflow.params import GramParams
from mergeflow.merge import merge_models
from mergeflow.methods import get_method
from mergeflow.models import load_model
from seq2seq_helpers import make_tiny_bart, make_tiny_t5
from test_merge import closed_form

ROWS = [
    {"input": "Question: is the fox quick?", "target": "yes"},
    {"input": "Article: Anna went to the shop because she needed milk. Summary:", "target": "Anna bought milk."},
    {"input": "2 + 2 =", "target": "4"},
    {"input": "the lazy dog", "target": "the dog is lazy and sleeps all day"},
    {"input": "no", "target": "true false"},
]


@pytest.fixture(scope="module")
def t5_experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5")
    return [make_tiny_t5(root / f"expert{i}", seed=10 + i) for i in range(2)]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


@pytest.fixture(scope="module")
def t5_grams(t5_experts, pairs_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("t5grams")
    outs = [root / f"g{i}" for i in range(2)]
    for expert, out in zip(t5_experts, outs):  # batches of 2 rows of unequal lengths on both sides: padding everywhere
        compute_grams(expert, pairs_file, out, GramParams(text_field="input", max_length=16, batch_size=2, dtype="float64"))
    return outs


def block_linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def direct_grams(model_dir, rows, max_length):
    """One unpadded row at a time in float64: the encoder on the input, the decoder on the target
    shifted right behind its start token; sum of x x^T of every block Linear's input."""
    model, tok = load_model(model_dir)
    model.double()
    tokens = 0
    with input_grams(block_linears(model)) as sums, torch.no_grad():
        for row in rows:
            ids = tok(row["input"], truncation=True, max_length=max_length)["input_ids"]
            labels = tok(text_target=row["target"], truncation=True, max_length=max_length)["input_ids"] if "target" in row else []
            decoder = [model.config.decoder_start_token_id, *labels[:-1]]
            model(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([decoder]), use_cache=False)
            tokens += len(ids)
    return sums, tokens


def test_t5_grams_equal_direct_computation_with_padding(t5_experts, t5_grams):
    expected, tokens = direct_grams(t5_experts[0], ROWS, max_length=16)
    grams = GramDir.open(t5_grams[0])
    assert grams.num_tokens == tokens  # encoder tokens
    assert set(grams.modules) == set(expected) and len(expected) == 2 * 7 + 2 * 11
    for module, value in expected.items():
        torch.testing.assert_close(grams.load(module), value, rtol=1e-5, atol=1e-5, msg=lambda m: f"{module}: {m}")


def test_cross_attention_kv_of_every_decoder_layer_share_the_encoder_output(t5_grams):
    modules = json.loads((t5_grams[0] / "grams.json").read_text())["modules"]
    kv = {modules[f"decoder.block.{b}.layer.1.EncDecAttention.{x}"]["key"] for b in range(2) for x in "kv"}
    assert kv == {"decoder.block.0.layer.1.EncDecAttention.k"}
    assert modules["decoder.block.1.layer.1.EncDecAttention.q"]["key"] == "decoder.block.1.layer.1.EncDecAttention.q"


def test_rows_without_target_are_refused_naming_file_and_row(t5_experts, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"input": "a", "target": "b"}\n{"input": "c", "target": ""}\n{"input": "d"}\n')
    with pytest.raises(ValueError) as err:
        compute_grams(t5_experts[0], data, tmp_path / "g", GramParams(text_field="input"))
    assert str(err.value) == (f"{data}: row 2 has no 'target' value; a seq2seq model is calibrated on input/target pairs "
                              "(the decoder is teacher-forced on the target): fill it in or drop the row")
    assert not (tmp_path / "g").exists()


def test_plain_text_rows_feed_the_encoder_and_the_decoder_its_start_token(t5_experts, tmp_path, caplog):
    rows = [{"text": r["input"]} for r in ROWS]
    data = tmp_path / "plain.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING):
        compute_grams(t5_experts[0], data, tmp_path / "g", GramParams(max_length=16, batch_size=2, dtype="float64"))
    assert "rows have no 'target' field" in caplog.text and "the decoder sees only its start token" in caplog.text
    expected, _ = direct_grams(t5_experts[0], [{"input": r["text"]} for r in rows], max_length=16)
    grams = GramDir.open(tmp_path / "g")
    for module, value in expected.items():
        torch.testing.assert_close(grams.load(module), value, rtol=1e-5, atol=1e-5, msg=lambda m: f"{module}: {m}")


def test_regmean_on_t5_equals_the_closed_form_and_loads(t5_experts, t5_grams, tmp_path):
    alpha = 0.5
    merge_models(t5_experts, get_method("regmean")({"alpha": alpha, "solver_dtype": "float64"}), tmp_path / "rm", grams=t5_grams)
    merged, expert_states = state(tmp_path / "rm"), [state(e) for e in t5_experts]
    gdirs = [GramDir.open(g) for g in t5_grams]
    solved = 0
    for name, tensor in merged.items():
        module = name.removesuffix(".weight")
        weights = [s[name].double() for s in expert_states]
        if module in gdirs[0].modules:
            expected = closed_form(weights, [g.load(module).double() / g.num_tokens for g in gdirs], alpha)
            solved += 1
        else:  # embeddings, relative position biases, norms, lm_head: averaged
            expected = sum(weights) / len(weights)
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert solved == 36
    model, tok = load_model(tmp_path / "rm")
    batch = tok(["the quick fox", "2 + 2 ="], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch, decoder_input_ids=torch.zeros(2, 3, dtype=torch.long)).logits
    assert logits.shape == (2, 3, len(tok)) and torch.isfinite(logits).all()


@pytest.mark.parametrize("method", ["average", "task_arithmetic", "ties"])
def test_other_methods_merge_t5(t5_experts, tmp_path, method):
    base = make_tiny_t5(tmp_path / "base", seed=9)
    merge_models(t5_experts, get_method(method)(), tmp_path / method, base=base if method != "average" else None)
    model, tok = load_model(tmp_path / method)
    with torch.no_grad():
        logits = model(**tok(["the dog"], return_tensors="pt"), decoder_input_ids=torch.zeros(1, 2, dtype=torch.long)).logits
    assert torch.isfinite(logits).all()


def test_encoder_decoders_run_on_lm_evals_seq2seq_hf_model(t5_experts):
    from mergeflow.evaluation.backends import model_args, resolve_backend
    from mergeflow.params import EvalParams

    params = EvalParams.model_validate({"hf": {"dtype": "float32", "batch_size": 4, "device": "cpu"}})
    assert model_args("hf", t5_experts[0], params) == {
        "pretrained": str(t5_experts[0]), "dtype": "float32", "batch_size": 4, "device": "cpu", "trust_remote_code": False, "backend": "seq2seq"}
    assert resolve_backend("auto", has_vllm=True, has_cuda=True, seq2seq=True) == "hf"
    with pytest.raises(ValueError, match=r"^backend vllm: the model is an encoder-decoder \(T5, BART\), which lm-eval's vLLM model does not run; use the hf or auto backend$"):
        resolve_backend("vllm", has_vllm=True, seq2seq=True)


def test_submission_with_a_t5(t5_experts, tmp_path, caplog):
    import pandas as pd

    from mergeflow.params import EvalParams
    from mergeflow.submission import write_submission

    test = tmp_path / "test.csv"
    pd.DataFrame({"id": [7, 8], "input": ["Pick the colour of the sky:", "the lazy dog " * 30], "eval_type": ["multiple_choice"] * 2,
                  "answer_choices": ["['blue', 'green', 'red']", "['yes', 'no']"]}).to_csv(test, index=False)
    params = EvalParams.model_validate({"backend": "auto", "hf": {"dtype": "float32", "batch_size": 4, "device": "cpu"}})
    with caplog.at_level(logging.WARNING):
        write_submission(t5_experts[0], test, tmp_path / "submission.csv", params=params)
    frame = pd.read_csv(tmp_path / "submission.csv")
    assert frame["id"].tolist() == [7, 8] and frame["prediction"].astype(int).tolist()[0] in (0, 1, 2)
    assert "row id=8: input longer than the model's 64 tokens" in caplog.text and "the encoder keeps the last 64 tokens" in caplog.text


def test_bart_grams_and_regmean(pairs_file, tmp_path):
    """Another encoder-decoder (learnt positions, biases, cross-attention named encoder_attn): the
    streams are found from token counts, not names."""
    experts = [make_tiny_bart(tmp_path / f"bart{i}", seed=i) for i in range(2)]
    grams = [tmp_path / f"g{i}" for i in range(2)]
    for expert, out in zip(experts, grams):
        compute_grams(expert, pairs_file, out, GramParams(text_field="input", max_length=16, batch_size=2, dtype="float64"))
    expected, tokens = direct_grams(experts[0], ROWS, max_length=16)
    g0 = GramDir.open(grams[0])
    assert g0.num_tokens == tokens and set(g0.modules) == set(expected) and len(expected) == 2 * 6 + 2 * 10
    for module, value in expected.items():
        torch.testing.assert_close(g0.load(module), value, rtol=1e-5, atol=1e-5, msg=lambda m: f"{module}: {m}")
    merge_models(experts, get_method("regmean")({"alpha": 0.5, "solver_dtype": "float64"}), tmp_path / "rm", grams=grams)
    merged, states, gdirs = state(tmp_path / "rm"), [state(e) for e in experts], [GramDir.open(g) for g in grams]
    for module in g0.modules:
        expected = closed_form([s[f"{module}.weight"].double() for s in states], [g.load(module) / g.num_tokens for g in gdirs], 0.5)
        torch.testing.assert_close(merged[f"{module}.weight"].double(), expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{module}: {m}")
    model, tok = load_model(tmp_path / "rm")
    with torch.no_grad():
        assert torch.isfinite(model(**tok(["the dog"], return_tensors="pt"), decoder_input_ids=torch.ones(1, 2, dtype=torch.long)).logits).all()


def test_bias_solve_on_decoder_linears_is_refused(pairs_file, tmp_path):
    """The bias fit assumes every Linear saw `num_tokens` tokens; an encoder-decoder's decoder saw another count."""
    experts = [make_tiny_bart(tmp_path / f"bart{i}", seed=i) for i in range(2)]
    grams = [tmp_path / f"g{i}" for i in range(2)]
    for expert, out in zip(experts, grams):
        compute_grams(expert, pairs_file, out, GramParams(text_field="input", max_length=16, batch_size=2))
    refs = json.loads((grams[0] / "grams.json").read_text())["modules"]
    assert refs["model.encoder.layers.0.fc1"].get("input_sum") and not refs["model.decoder.layers.0.fc1"].get("input_sum")
    with pytest.raises(ValueError, match=r"no input sum for model\.decoder\.layers\.\d\.[a-z_.0-9]+: an encoder-decoder's decoder Linears cannot have their bias "
                                         r"solved yet \(their token count differs from the encoder's\); set merge\.regmean_bias: average$"):
        merge_models(experts, get_method("regmean")({"alpha": 0.5, "regmean_bias": "solve"}), tmp_path / "rm", grams=grams)
    assert not (tmp_path / "rm").exists()
