"""Short, deterministic CPU training of tiny causal LMs on (prompt, answer) examples."""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .skills import Example

log = logging.getLogger(__name__)
IGNORE = -100


def _batch(prompts: list[list[int]], full: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch whose labels cover only the answers (the prompts are random noise)."""
    width = max(len(ids) for ids in full)
    input_ids = torch.full((len(full), width), pad_id)
    labels = torch.full((len(full), width), IGNORE)
    mask = torch.zeros((len(full), width), dtype=torch.long)
    for row, (p, ids) in enumerate(zip(prompts, full)):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(p) : len(ids)] = torch.tensor(ids[len(p) :])
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate: linear warm-up over `warmup` steps, then cosine decay to zero at `steps`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def optimizer_step(loss: torch.Tensor, params, optimizer: torch.optim.Optimizer, schedule) -> float:
    """One step, gradients clipped to norm 1 and the schedule advanced; return the loss."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def closing_loss(losses: list[float]) -> float:
    """The mean loss of the last 10% of the steps (at least one): what a run reports."""
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail)


def train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    batch_size: int,
    lr: float,
    seed: int,
    desc: str,
) -> list[float]:
    """Train `model` in place for one pass over `examples`; return the loss of every step
    (`closing_loss` of them is what a run reports).

    Warm-up then cosine decay of the learning rate; a fixed seed makes the run repeatable.
    """
    torch.manual_seed(seed)
    steps = len(examples) // batch_size
    if steps < 1:
        raise ValueError(f"{desc}: need at least one batch of {batch_size} examples, got {len(examples)}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = warmup_cosine(optimizer, steps, warmup)
    prompts = tokenizer([ex.prompt for ex in examples])["input_ids"]
    full = tokenizer([ex.text for ex in examples])["input_ids"]
    model.train()
    losses: list[float] = []
    for step in tqdm(range(steps), desc=desc, unit="step", mininterval=2):
        rows = slice(step * batch_size, (step + 1) * batch_size)
        batch = _batch(prompts[rows], full[rows], tokenizer.pad_token_id)
        losses.append(optimizer_step(model(**batch).loss, model.parameters(), optimizer, schedule))
    model.eval()
    log.info("%s: %d steps, final loss %.4f", desc, steps, closing_loss(losses))
    return losses
