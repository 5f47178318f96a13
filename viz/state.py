"""Where every prompt position of one layer is at a given decode step, read off the trace.

This only combines what the trace recorded (``layers[l].group``, ``layers[l].kept``,
``protected`` and ``positions_at``); it never re-derives anchors or merges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PROTECTED, ANCHOR, MERGED, EVICTED = "protected", "anchor", "merged", "evicted"


@dataclass
class PromptState:
    """The state of the ``T`` prompt positions of one layer after decode step ``step``.

    Attributes
    ----------
    group : ``[T]`` original position of the entry holding each position (-1: evicted at
        the prefill), i.e. ``trace.layers[layer].group``.
    status : list of ``T`` strings: ``protected``, ``anchor`` (a kept entry), ``merged``
        (folded into another entry) or ``evicted`` (dropped at the prefill).
    dropped : ``[T]`` bool, True where the entry holding the position was removed while
        decoding, at or before ``step``.
    dropped_at : ``[T]`` the decode step of that removal, -1 if none.
    """

    layer: int
    step: int
    group: np.ndarray
    status: list[str]
    dropped: np.ndarray
    dropped_at: np.ndarray

    @property
    def anchors(self) -> np.ndarray:
        """Kept, unprotected positions (Elastic's anchors; plain kept entries otherwise)."""
        return np.array([p for p, s in enumerate(self.status) if s == ANCHOR], dtype=np.int64)


def prompt_state(trace, layer: int, step: int) -> PromptState:
    """Read the state of ``layer``'s prompt positions after decode step ``step``."""
    lt = trace.layers[layer]
    T = trace.prompt_length
    positions = np.arange(T)
    group = np.asarray(lt.group, dtype=np.int64)
    protected = set(np.asarray(trace.protected).tolist())
    status = []
    for p, g in zip(positions.tolist(), group.tolist()):
        if g < 0:
            status.append(EVICTED)
        elif g != p:
            status.append(MERGED)
        else:
            status.append(PROTECTED if p in protected else ANCHOR)
    held = trace.positions_at(layer, step)
    holder_gone = (group >= 0) & ~np.isin(group, held)
    dropped_at = np.full(T, -1, dtype=np.int64)
    rows = trace.evictions_of(layer)
    gone_step = {int(p): int(s) for s, p in rows if s <= step}
    for p in np.flatnonzero(holder_gone):
        dropped_at[p] = gone_step.get(int(group[p]), step)
    return PromptState(layer, step, group, status, holder_gone, dropped_at)
