"""Text metrics shared by the evaluation and the app."""

from __future__ import annotations

import functools
import math


@functools.cache
def _scorer():
    # Imported on first use: `import elastic` must work without the optional rouge-score.
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ImportError(
            "ROUGE-L needs the rouge-score package: pip install 'elastic-cache-explorer[eval]'"
        ) from None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of ``prediction`` against ``reference`` (the ``rouge-score`` package).

    Two empty texts agree perfectly (1.0); one empty text scores 0.0.
    """
    if not prediction.strip() and not reference.strip():
        return 1.0
    return _scorer().score(reference, prediction)["rougeL"].fmeasure


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp of the mean negative log-likelihood per token."""
    return math.exp(nll_sum / tokens) if tokens else float("nan")
