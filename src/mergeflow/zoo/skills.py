"""The toy zoo's skills: deterministic generators of (prompt, answer) pairs whose answers can be
checked exactly.

- `copy` (the base model's pretraining): ``cp(ab12)=`` -> ``ab12``
- `math` (an expert): multi-digit addition with carries, ``1397+5=`` -> ``1402``
- `code` (an expert): a small string program, ``rev(abcd)=`` -> ``dcba``
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable, TypeVar

T = TypeVar("T")

LETTERS = string.ascii_lowercase[:10]


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        """The training/calibration text: the prompt followed by its answer and a newline."""
        return f"{self.prompt}{self.answer}\n"


def _word(rng: random.Random, alphabet: str, low: int, high: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


def copy_example(rng: random.Random) -> Example:
    s = _word(rng, LETTERS + string.digits, 2, 6)
    return Example(f"cp({s})=", s)


def math_example(rng: random.Random) -> Example:
    a, b = rng.randint(10, 9999), rng.randint(0, 9)
    return Example(f"{a}+{b}=", str(a + b))


def code_example(rng: random.Random) -> Example:
    s = _word(rng, LETTERS, 3, 6)
    return Example(f"rev({s})=", s[::-1])


SKILLS: dict[str, Callable[[random.Random], Example]] = {
    "copy": copy_example,
    "math": math_example,
    "code": code_example,
}


def draw_distinct(generate: Callable[[random.Random], T], key: Callable[[T], str], n: int, rng: random.Random, exclude: set[str] | frozenset[str], unique: bool, what: str) -> list[T]:
    """`n` draws of `generate` whose `key` is not in `exclude` (nor repeated, if `unique`)."""
    seen: set[str] = set(exclude)
    out: list[T] = []
    for _ in range(100 * n + 1000):
        if len(out) == n:
            return out
        item = generate(rng)
        k = key(item)
        if k in exclude or (unique and k in seen):
            continue
        seen.add(k)
        out.append(item)
    raise ValueError(f"could not draw {n} distinct {what}; ask for fewer")


def sample(skill: str, n: int, seed: int, exclude: set[str] = frozenset(), unique: bool = False) -> list[Example]:
    """Draw `n` examples of `skill`, skipping prompts in `exclude` (and repeats if `unique`)."""
    if skill not in SKILLS:
        raise ValueError(f"unknown toy skill {skill!r}; known skills: {sorted(SKILLS)}")
    return draw_distinct(SKILLS[skill], lambda ex: ex.prompt, n, random.Random(f"{skill}:{seed}"), exclude, unique, f"{skill!r} examples")
