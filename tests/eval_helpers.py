"""For evaluation tests: lm-eval LMs with scripted answers, a toy model with a long context, and a
test.csv with the traits of the LLM-Merging competition's."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from helpers import make_tiny_llama
from lm_eval.api.model import LM


def long_context_llama(path: Path, seed: int = 3, positions: int = 1024) -> Path:
    """A tiny random Llama that takes `positions` tokens (the competition's inputs are long)."""
    make_tiny_llama(path, seed=seed)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": positions}))
    return path


class ScriptedLM(LM):
    """`generate_until` answers `answer(context, gen_kwargs)`; `loglikelihood` prefers `favourite`."""

    def __init__(self, answer: Callable[[str, dict], str] = lambda ctx, kw: "", favourite: Callable[[str, str], bool] = lambda ctx, cont: False):
        super().__init__()
        self.answer, self.favourite = answer, favourite
        self.gen_kwargs: list[dict] = []

    def generate_until(self, requests, disable_tqdm: bool = False):
        out = []
        for r in requests:
            context, kwargs = r.args
            self.gen_kwargs.append(kwargs)
            out.append(self.answer(context, kwargs))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return [(0.0 if self.favourite(*r.args) else -10.0, False) for r in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return [0.0 for _ in requests]


# What makes the competition's test.csv (807 rows) hard to read, each in a generated row: inputs
# with newlines (562 rows), double quotes (124), commas and non-ASCII text (56); choices with
# commas (27 rows), apostrophes (36, so repr() quotes them with "), up to 152 characters; 2, 4 or
# 8 choices; generation rows with an empty answer_choices; and values pandas reads as NaN unless
# told not to ("NA", "None", "null").
INPUTS = ["Write an ad copy, at most 150 words:\nA digital photo frame.", 'He said "stop", twice.\n\nWhy?', "Café, naïve, 東京: which is a city?", "NA", "x" * 500]
CHOICES = [["advertising", "shipping", "storage", "quality control"], ["prints string 'b'", "checks if a is b, prints True"],
           ["None", "null", "NA", "nan", "0", "1", "True", "the end, " + "y" * 143], ["Déjà vu", 'say "hi"']]


def competition_rows(n: int = 807) -> list[dict]:
    """`n` rows of a test.csv with the competition's traits (ids 0..n-1, every third row generation)."""
    rows = []
    for i in range(n):
        text = INPUTS[i % len(INPUTS)]
        if i % 3 == 2:
            rows.append({"id": i, "input": text, "eval_type": "generation", "answer_choices": "", "choices": None})
        else:
            choices = CHOICES[i % len(CHOICES)]
            rows.append({"id": i, "input": text, "eval_type": "multiple_choice", "answer_choices": repr(choices), "choices": choices})
    return rows


def write_competition_csv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows)[["id", "input", "eval_type", "answer_choices"]].to_csv(path, index=False)
    return path
