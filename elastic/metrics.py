"""Text metrics shared by the evaluation and the app."""

from __future__ import annotations

import math

from rouge_score import rouge_scorer

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of ``prediction`` against ``reference`` (the ``rouge-score`` package).

    Two empty texts agree perfectly (1.0); one empty text scores 0.0.
    """
    if not prediction.strip() and not reference.strip():
        return 1.0
    return _SCORER.score(reference, prediction)["rougeL"].fmeasure


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp of the mean negative log-likelihood per token."""
    return math.exp(nll_sum / tokens) if tokens else float("nan")
