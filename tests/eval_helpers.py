"""For evaluation tests: lm-eval LMs with scripted answers, and a toy model with a long context."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

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
