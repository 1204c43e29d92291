"""Deterministic CPU fine-tuning of a chat model's top layers on (question, answer) chats.

Full fine-tuning of the Linear weights of the last few transformer blocks, everything else
frozen, rather than LoRA: the backward pass stops at the first trained block (8 of SmolLM2's 30
blocks: about half the work of training end to end), the experts differ from their base in
dense Linear weights, which is what merging methods have to reconcile and what RegMean's grams
describe, and there is nothing to merge back (a LoRA would cost the same forward pass and change
the same weights, only in low rank). The tied input/output embeddings are never trained, so they
stay tied. The loss covers the reply and the end-of-turn token only, and the output layer is
applied to those positions alone (it is a fifth of the model's FLOPs per token).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .chat_skills import Question
from .train import IGNORE, _batch, closing_loss, optimizer_step, warmup_cosine

log = logging.getLogger(__name__)


def encode(tokenizer, question: Question) -> tuple[list[int], list[int]]:
    """(prompt ids up to the assistant's turn, the whole chat's ids) with the chat template."""
    prompt = tokenizer.apply_chat_template(question.messages(with_answer=False), add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(question.messages(), tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the answer's turn differently from the generation prompt; cannot mask the prompt")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer = full[len(prompt):].rstrip("\n")  # the answer and the end-of-turn token, not what follows
    return prompt_ids, prompt_ids + tokenizer(answer, add_special_tokens=False)["input_ids"]


def trainable_parameters(model, layers: Sequence[int], modules: str) -> list[torch.nn.Parameter]:
    """Freeze everything but the Linear weights of blocks `layers` (`mlp`, `attn` or `all` of them)."""
    kinds = {"mlp": ("mlp.",), "attn": ("self_attn.",), "all": ("mlp.", "self_attn.")}[modules]
    prefixes = tuple(f"model.layers.{i}.{k}" for i in layers for k in kinds)
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes) and name.endswith(".weight"))
        if p.requires_grad:
            params.append(p)
    if not params:
        raise ValueError(f"no trainable weights in layers {list(layers)} ({modules}); check models.smollm2.train_layers")
    return params


def finetune(model, tokenizer, questions: Sequence[Question], *, layers: Sequence[int], modules: str, batch_size: int, lr: float, seed: int, desc: str) -> list[float]:
    """Train in place for one pass over `questions`; return the loss of every step.

    AdamW with warm-up and cosine decay; a fixed seed and a fixed order make the run repeatable.
    """
    torch.manual_seed(seed)
    steps = len(questions) // batch_size
    if steps < 1:
        raise ValueError(f"{desc}: need at least one batch of {batch_size} questions, got {len(questions)}")
    params = trainable_parameters(model, layers, modules)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 10)
    schedule = warmup_cosine(optimizer, steps, warmup)
    encoded = [encode(tokenizer, q) for q in questions]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.train()
    losses: list[float] = []
    for step in tqdm(range(steps), desc=desc, unit="step", mininterval=5):
        rows = encoded[step * batch_size : (step + 1) * batch_size]
        batch = _batch([p for p, _ in rows], [f for _, f in rows], pad)
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE  # position t predicts token t + 1
        logits = model.lm_head(hidden[:, :-1][keep])
        loss = torch.nn.functional.cross_entropy(logits.float(), labels[keep])
        losses.append(optimizer_step(loss, params, optimizer, schedule))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    log.info("%s: %d steps of %d, final loss %.4f", desc, steps, batch_size, closing_loss(losses))
    return losses


def scored(text: str, question: Question) -> str:
    """What the evaluation compares with the answer, as the `chat_math` and `chat_list` tasks'
    filters take it: the reply's last list for a list answer, else its last number."""
    found = re.findall(r"\[[^\[\]]*\]" if question.answer.startswith("[") else r"-?\d+", text)
    return found[-1].strip() if found else ""


@torch.no_grad()
def exact_match(model, tokenizer, questions: Sequence[Question], *, batch_size: int = 32, max_new_tokens: int = 24) -> float:
    """Greedy answers scored by exact match (a quick check; the pipeline's numbers come from lm-eval)."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        correct = 0
        for start in range(0, len(questions), batch_size):
            chunk = questions[start : start + batch_size]
            texts = [tokenizer.apply_chat_template(q.messages(with_answer=False), add_generation_prompt=True, tokenize=False) for q in chunk]
            inputs = tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True)
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            answers = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            correct += sum(scored(a, q) == q.answer for a, q in zip(answers, chunk))
        return correct / len(questions)
    finally:
        tokenizer.padding_side = side
