"""Budget arithmetic: the one place that turns a KV budget into entry counts.

The budget ``gamma`` is the fraction of KV entries kept, counted over every token seen so
far (SPEC 1): after the prefill a layer holds ``ceil(gamma * T)`` entries, and after ``n``
generated tokens at most ``ceil(gamma * (T + n))``.
"""

from __future__ import annotations

import math

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


def min_budget(tokens: int, minimum: int) -> float:
    """Smallest budget whose ``keep_count`` is not raised by ``minimum`` (for UI warnings)."""
    return minimum / tokens if tokens else 1.0
