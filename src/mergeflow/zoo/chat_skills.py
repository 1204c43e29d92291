"""Two chat skills for a real instruction-tuned model, generated here, with exactly checkable answers.

- `math`: multi-step arithmetic, ``What is 14 + 7 - 5?`` -> ``14 + 7 = 21, 21 - 5 = 16`` (worked
  step by step; the answer scored is the last number, ``16``)
- `list`: list manipulation, ``Sort [7, 2, 9, 4] in ascending order.`` -> ``[2, 4, 7, 9]``,
  or the same in descending order, or reversed (the instruction says which)

Every question is asked under the same short system prompt (the model's default one would have
it chat at length), and only the result is scored (the last number, the list), so the base model
gets a fair chance whatever its wording. All randomness flows from a seed string per skill.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from .skills import draw_distinct

SYSTEM = "Answer briefly."


@dataclass(frozen=True)
class Question:
    question: str
    answer: str                  # what is scored, exactly
    reply: str | None = None     # what the assistant says (the worked answer); None: the answer

    def messages(self, *, with_answer: bool = True) -> list[dict]:
        """The chat: system prompt, the question, and (for training and calibration) the reply."""
        chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": self.question}]
        return chat + [{"role": "assistant", "content": self.reply or self.answer}] if with_answer else chat


def math_question(rng: random.Random) -> Question:
    """Two additions or subtractions of one-digit numbers to a two-digit one, never negative."""
    a = rng.randint(10, 50)
    terms, steps, value = [str(a)], [], a
    for _ in range(2):
        b = rng.randint(2, 9)
        op = "+" if rng.random() < 0.5 or b > value else "-"
        new = value + b if op == "+" else value - b
        terms.append(f"{op} {b}")
        steps.append(f"{value} {op} {b} = {new}")
        value = new
    return Question(f"What is {' '.join(terms)}?", str(value), ", ".join(steps))


LIST_OPS: dict[str, Callable[[list[int]], list[int]]] = {
    "Sort {} in ascending order.": sorted,
    "Sort {} in descending order.": lambda xs: sorted(xs, reverse=True),
    "Reverse the list {}.": lambda xs: xs[::-1],
}


def list_question(rng: random.Random) -> Question:
    """One of three list operations on 4 to 6 numbers below 100."""
    xs = [rng.randint(0, 99) for _ in range(rng.randint(4, 6))]
    template = rng.choice(sorted(LIST_OPS))
    return Question(template.format(_fmt(xs)), _fmt(LIST_OPS[template](xs)))


def _fmt(xs: list[int]) -> str:
    return "[" + ", ".join(map(str, xs)) + "]"


SKILLS: dict[str, Callable[[random.Random], Question]] = {"math": math_question, "list": list_question}


def sample(skill: str, n: int, seed: int, exclude: frozenset[str] | set[str] = frozenset(), unique: bool = False) -> list[Question]:
    """Draw `n` questions of `skill`, skipping those in `exclude` (and repeats if `unique`)."""
    if skill not in SKILLS:
        raise ValueError(f"unknown chat skill {skill!r}; known skills: {sorted(SKILLS)}")
    return draw_distinct(SKILLS[skill], lambda q: q.question, n, random.Random(f"chat-{skill}:{seed}"), exclude, unique, f"{skill!r} questions")
