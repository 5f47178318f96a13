"""StreamingLLM's local window (Xiao et al., ICLR 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Decode, Policy
from .plans import keep_mask


@dataclass
class LocalPolicy(Policy):
    """StreamingLLM (Xiao et al., ICLR 2024): ``start_size`` sinks plus the most recent entries.

    Parameters
    ----------
    budget : float, default 0.5
    start_size : int, default 1
    """

    budget: float = 0.5

    name: ClassVar[str] = "local"
    summary: ClassVar[str] = "keeps the first tokens (attention sinks) and the most recent ones"

    def protected(self, prompt_length, spans=None):
        return list(range(self.sinks(prompt_length)))

    def plan_prefill(self, scores, prompt):
        T, n_keep = prompt.length, self.prompt_keep(prompt)
        positions = prompt.positions()
        recent = n_keep - len(self.protected(T))
        return keep_mask((positions < self.start_size) | (positions >= T - recent), prompt)

    def decode_victim(self, view: Decode):
        return view.slot_of_rank(self.sinks(view.prompt_length))  # the oldest entry after the sinks
