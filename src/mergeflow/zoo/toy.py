"""The embedded toy zoo: a tiny Llama base model and two experts built on CPU in about a minute.

The base is pretrained on copying strings (`copy`); the experts start from it and are fine-tuned on
one skill each (`math`: addition, `code`: string reversal). All randomness flows from `seed`, so
the same parameters give the same weights and data on the same machine. Next to the models it
writes each skill's calibration data (for grams), disjoint evaluation data and a toy `test.csv`
in the LLM-Merging competition's format. The pipeline builds the base, each expert and the
evaluation data in separate DVC stages, so each step reads only its own parameters.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from ..atomic import atomic_dir, atomic_file, write_jsonl
from ..params import ToyZooParams
from ..submission import COLUMNS
from . import skills
from .tokenizer import build_tokenizer
from .train import train

log = logging.getLogger(__name__)
MAX_LENGTH = 32
TOY_SKILLS = ("math", "code")  # the experts a toy zoo can have; their order sets their seeds


def toy_config(p: ToyZooParams, vocab_size: int, tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads,
        num_key_value_heads=p.num_kv_heads,
        max_position_embeddings=MAX_LENGTH * 2,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _save(model: LlamaForCausalLM, tokenizer, out: Path) -> None:
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def _seed_offset(skill: str) -> int:
    """An expert's seeds follow its skill's place in TOY_SKILLS, not its place in `experts`, so that
    each expert is built from the parameters and its own name alone (one DVC stage per expert)."""
    if skill not in TOY_SKILLS:
        raise ValueError(f"params.yaml: expert {skill!r} has no toy skill; with models.source: toy, experts must be among {sorted(TOY_SKILLS)}")
    return TOY_SKILLS.index(skill)


def held_out(p: ToyZooParams, skill: str) -> list[skills.Example]:
    """The evaluation examples of `skill` then its test rows: never trained on nor calibrated with."""
    return skills.sample(skill, p.eval_samples + p.test_rows, p.seed + 100 + _seed_offset(skill), unique=True)


def build_base(p: ToyZooParams, models_dir: Path) -> list[float]:
    """Pretrain the base on copying strings and save it as `base/`; return the loss of every step."""
    torch.manual_seed(p.seed)
    tokenizer = build_tokenizer(MAX_LENGTH * 2)
    model = LlamaForCausalLM(toy_config(p, len(tokenizer), tokenizer))
    log.info("toy base: %.2fM parameters", sum(t.numel() for t in model.parameters()) / 1e6)
    copy_data = skills.sample("copy", p.base_steps * p.batch_size, p.seed)
    losses = train(model, tokenizer, copy_data, batch_size=p.batch_size, lr=p.base_lr, seed=p.seed, desc="base (copy)")
    _save(model, tokenizer, models_dir / "base")
    return losses


def build_expert(p: ToyZooParams, skill: str, models_dir: Path, data_dir: Path) -> list[float]:
    """Fine-tune the saved base on `skill` into `experts/<skill>/`, then write its calibration
    data; return the loss of every step."""
    k = _seed_offset(skill)
    exclude = {ex.prompt for ex in held_out(p, skill)}
    tokenizer = build_tokenizer(MAX_LENGTH * 2)
    model = LlamaForCausalLM(toy_config(p, len(tokenizer), tokenizer))  # the base's architecture, then its weights
    model.load_state_dict(load_file(models_dir / "base" / "model.safetensors"))
    data = skills.sample(skill, p.expert_steps * p.batch_size, p.seed + 1 + k, exclude=exclude)
    losses = train(model, tokenizer, data, batch_size=p.batch_size, lr=p.expert_lr, seed=p.seed + 1 + k, desc=f"expert {skill}")
    _save(model, tokenizer, models_dir / "experts" / skill)
    calib = skills.sample(skill, p.calib_samples, p.seed + 200 + k, exclude=exclude)  # last: never data without its model
    write_jsonl(data_dir / "calib" / f"{skill}.jsonl", [{"text": ex.text} for ex in calib])
    return losses


def write_eval_data(p: ToyZooParams, experts: list[str], data_dir: Path) -> None:
    """Write the evaluation JSONL of each skill and a toy `test.csv` from their held-out examples."""
    test_rows: list[tuple[str, str, list[str] | None]] = []
    for skill in experts:
        evaluation = held_out(p, skill)
        write_jsonl(data_dir / "eval" / f"{skill}.jsonl", [{"prompt": ex.prompt, "answer": ex.answer} for ex in evaluation[: p.eval_samples]])
        test_rows += submission_rows(evaluation[p.eval_samples :], skills.SKILLS[skill], random.Random(p.seed + 300 + _seed_offset(skill)))
    random.Random(p.seed).shuffle(test_rows)
    write_test_csv(data_dir / "test.csv", test_rows)


def submission_rows(examples: list[skills.Example], draw: Callable[[random.Random], Any], rng: random.Random) -> list[tuple[str, str, list[str] | None]]:
    """Half generation rows, half multiple choice with the right answer among the answers of other
    questions of the skill (`draw(rng).answer`)."""
    rows = []
    for j, ex in enumerate(examples):
        if j % 2 == 0:
            rows.append((ex.prompt, "generation", None))
            continue
        choices = {ex.answer}
        while len(choices) < (4 if j % 4 == 1 else 2):
            choices.add(draw(rng).answer)
        ordered = sorted(choices)
        rng.shuffle(ordered)
        rows.append((ex.prompt, "multiple_choice", ordered))
    return rows


def write_test_csv(path: Path, rows: list[tuple[str, str, list[str] | None]]) -> None:
    frame = pd.DataFrame([(i, text, kind, "" if choices is None else repr(choices)) for i, (text, kind, choices) in enumerate(rows)], columns=COLUMNS)
    with atomic_file(path) as tmp:
        frame.to_csv(tmp, index=False)


def build_toy_zoo(p: ToyZooParams, experts: list[str], models_dir: Path, data_dir: Path) -> dict[str, list[float]]:
    """The whole toy zoo at once (the pipeline runs these steps as separate stages): evaluation
    data, the base, then each expert; return the loss of every training step per model."""
    unknown = sorted(set(experts) - set(TOY_SKILLS))
    if unknown:
        raise ValueError(f"params.yaml: experts {unknown} have no toy skill; with models.source: toy, experts must be among {sorted(TOY_SKILLS)}")
    write_eval_data(p, experts, data_dir)
    losses = {"base": build_base(p, models_dir)}
    for skill in experts:
        losses[skill] = build_expert(p, skill, models_dir, data_dir)
    return losses
