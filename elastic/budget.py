"""Budget arithmetic: the one place that turns a KV budget into entry counts.

The budget ``gamma`` is the fraction of KV entries kept, counted over every token seen so
far (SPEC 1): after the prefill a layer holds ``ceil(gamma * T)`` entries, and after ``n``
generated tokens at most ``ceil(gamma * (T + n))``.
"""

from __future__ import annotations

import math

import numpy as np

# ceil(0.3 * 10) is 4 in floating point (0.30000000000000004 * 10); the tolerance makes it 3.
_EPS = 1e-9


def check_budget(budget: float) -> float:
    """Return ``budget`` as a float, or raise ``ValueError`` if it is not in (0, 1]."""
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a number in (0, 1], got {budget!r}") from None
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise ValueError(
            f"budget must be in (0, 1] (the fraction of KV entries kept; 1.0 = full cache), got {budget!r}"
        )
    return value


def keep_count(budget: float, tokens: int, minimum: int = 1) -> int:
    """Entries a layer may hold after seeing ``tokens`` tokens: ``ceil(budget * tokens)``.

    Never less than ``minimum`` (the protected entries plus one anchor) and never more than
    ``tokens``. Raise if ``tokens`` is too small to keep ``minimum`` entries at all.
    """
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    n = math.ceil(budget * tokens - _EPS)
    return min(tokens, max(n, minimum))


def share_count(entries: int, ratio: float) -> int:
    """Entries of ``entries`` set aside as a share ``ratio`` (a recent window):
    ``floor(ratio * entries)``, at most ``entries - 1`` so one entry is left for the rest."""
    return max(0, min(entries - 1, math.floor(ratio * entries + _EPS)))


def min_budget(tokens: int, minimum: int) -> float:
    """Smallest budget whose ``keep_count`` is not raised by ``minimum`` (for UI warnings)."""
    return minimum / tokens if tokens else 1.0


# ---------------------------------------------------------------- budgets per layer
#
# A policy with one budget per layer (PrefixKV, VL-Cache) keeps what the budget allows all
# layers together, ``ceil(budget x layers x T)`` entries after the prefill, spread over the
# layers. A layer then holds its own ratio ``r_l = k_l / T`` while decoding
# (``keep_count(r_l, tokens)``): the ratios average to the budget, so the total stays
# within one entry per layer of ``budget x`` the full cache's at every step.

def layer_total(budget: float, tokens: int, layers: int, minimum: int = 1) -> int:
    """Entries all ``layers`` together keep after a ``tokens``-token prefill:
    ``ceil(budget * layers * tokens)``, at least ``minimum`` per layer, at most all."""
    n = math.ceil(budget * layers * tokens - _EPS)
    return min(layers * tokens, max(n, layers * min(minimum, tokens)))


def layer_ratio(kept: int, tokens: int) -> float:
    """The budget a layer that keeps ``kept`` of ``tokens`` entries holds while decoding
    (``keep_count(layer_ratio(k, T), T) == k`` exactly)."""
    return kept / tokens if tokens else 1.0


def distribute(total: int, weights, minimum: int, maximum: int) -> list[int]:
    """Split ``total`` entries over layers in proportion to ``weights``, each in
    ``[minimum, maximum]``, summing to exactly ``total``.

    The real-valued shares ``clamp(c * w_l, minimum, maximum)`` are found by bisection on
    ``c`` (a clamped layer's surplus is renormalised onto the others, as VL-Cache's
    clamp-and-renormalise intends), then rounded by largest remainder (a tie goes to the
    earlier layer).
    """
    weights = [max(0.0, float(w)) for w in weights]
    n = len(weights)
    if not n:
        return []
    if minimum > maximum:
        raise ValueError(f"minimum {minimum} > maximum {maximum}")
    total = min(max(total, n * minimum), n * maximum)
    if sum(weights) <= 0:
        weights = [1.0] * n

    def shares(c):
        return [min(maximum, max(minimum, c * w)) for w in weights]

    lo, hi = 0.0, 1.0
    while sum(shares(hi)) < total:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(shares(mid)) < total else (lo, mid)
    exact = shares(hi)
    counts = [min(maximum, math.floor(x + _EPS)) for x in exact]
    order = sorted(range(n), key=lambda l: (-(exact[l] - counts[l]), l))
    short = total - sum(counts)
    for l in (order * 2)[: 2 * n]:  # at most one pass over the layers is ever needed
        if short <= 0:
            break
        if counts[l] < maximum:
            counts[l] += 1
            short -= 1
    while short < 0:  # floor(x + eps) overshot (shares at the maximum): take back the smallest remainders
        l = max((l for l in range(n) if counts[l] > minimum), key=lambda l: (counts[l] - exact[l], l))
        counts[l] -= 1
        short += 1
    return counts


def mass_threshold_counts(masses, total: int, minimum: int, forced: int = 0) -> list[int]:
    """PrefixKV's per-layer counts: one shared threshold ``p`` on the cumulative sorted
    attention mass, set so that all layers together keep exactly ``total`` entries.

    ``masses[l]`` are layer ``l``'s scores of the positions it may drop, in any order;
    ``forced`` positions per layer (sinks, the last token) are kept anyway, and count
    against ``total``; every layer keeps at least ``minimum`` entries in all. A layer keeps
    its ``k``-th best position iff the share of its mass reached before it is below ``p``.
    The paper's binary search on ``p`` converges to the ``total``-th smallest of those
    "mass before" values over all layers; taking the first ``total`` of them in one sort
    is that search's answer, exact (a tie goes to the earlier layer, then the better entry).
    """
    free = max(0, minimum - forced)  # best entries every layer keeps regardless
    before, layer_of, counts = [], [], []
    for l, mass in enumerate(masses):
        values = np.sort(np.clip(np.asarray(mass, dtype=np.float64), 0.0, None))[::-1]
        cumulative = np.concatenate([[0.0], np.cumsum(values)[:-1]]) / (values.sum() or 1.0)
        counts.append(forced + min(free, len(values)))
        before.append(cumulative[free:])
        layer_of.append(np.full(max(0, len(values) - free), l))
    before, layer_of = np.concatenate(before), np.concatenate(layer_of)
    chosen = layer_of[np.argsort(before, kind="stable")[: max(0, total - sum(counts))]]
    return [c + int(n) for c, n in zip(counts, np.bincount(chosen, minlength=len(counts)))]
