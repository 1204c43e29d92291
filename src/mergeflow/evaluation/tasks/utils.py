"""Helpers of the shipped task YAMLs (`!function utils.NAME`); lm-eval imports this file by path."""

from __future__ import annotations

from mergeflow.submission import parse_choices


def answer_choices(doc: dict) -> list[str]:
    """The competition CSV's `answer_choices`, read as `mergeflow submit` reads test.csv's."""
    return parse_choices(doc["answer_choices"], doc.get("id"))


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
