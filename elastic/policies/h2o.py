"""H2O, the heavy-hitter oracle (Zhang et al., NeurIPS 2023)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .. import scoring
from ..budget import share_count
from .base import Decode, Policy
from .plans import lowest_score_slot, recent_and_top


@dataclass
class H2OPolicy(Policy):
    """H2O, heavy-hitter oracle (Zhang et al., NeurIPS 2023), as the paper's baseline.

    Per layer, every entry accumulates the attention it receives (prefill and every decode
    step, mean over heads). The budget is split between the most recent entries
    (``recent_ratio``) and the heavy hitters, the entries with the largest accumulated
    score; when over budget, the lowest-scoring entry outside the recent window goes.

    Parameters
    ----------
    budget : float, default 0.5
    recent_ratio : float, default 0.5
        Share of the budget reserved for the most recent entries (H2O: half and half).
    """

    budget: float = 0.5
    recent_ratio: float = 0.5

    name: ClassVar[str] = "h2o"
    summary: ClassVar[str] = "keeps the entries that received the most attention, plus a recent window"
    scores_decode = True
    scores_prefill = True

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(f"recent_ratio must be in [0, 1], got {self.recent_ratio!r}")

    def recent_size(self, capacity: int) -> int:
        """The recent window of a layer that may hold ``capacity`` entries."""
        return share_count(capacity, self.recent_ratio)

    def score(self, query, key, scaling):
        return scoring.attention_received(query, key, scaling)

    def plan_prefill(self, scores, prompt):
        n_keep = self.prompt_keep(prompt)
        return recent_and_top(scores, prompt, n_keep, self.recent_size(n_keep))

    def decode_victim(self, view: Decode):
        recent = self.recent_size(view.capacity())
        positions = view.positions
        # Older than the recent window: at most the (S - recent)-th smallest position.
        newest_old = positions.gather(1, view.slot_of_rank(view.get_seq_length() - recent - 1)[:, None])
        return lowest_score_slot(view, view.accumulated, positions <= newest_old)
