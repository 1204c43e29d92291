"""Helpers of the shipped task YAMLs (`!function utils.NAME`); lm-eval imports this file by path."""

from __future__ import annotations

import ast


def answer_choices(doc: dict) -> list[str]:
    """The competition CSV's `answer_choices`, a Python-literal list string, parsed safely."""
    choices = ast.literal_eval(doc["answer_choices"])
    if not isinstance(choices, (list, tuple)) or len(choices) < 2:
        raise ValueError(f"row id={doc.get('id')}: answer_choices {doc['answer_choices']!r} is not a list of at least two choices")
    return [str(c) for c in choices]


_SCORER = None


def rouge(doc: dict, results: list[str]) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum F1 of the generation against `target`, computed locally with `rouge_score`.

    Lsum treats newlines as sentence breaks, as the `evaluate` hub metric does.
    """
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=False)
    scores = _SCORER.score(str(doc["target"]), results[0].strip())
    return {name: score.fmeasure for name, score in scores.items()}
