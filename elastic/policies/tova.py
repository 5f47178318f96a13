"""TOVA (Oren et al., 2024): the newest token's attention decides, at every step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import scoring
from .base import HEADS, Decode, Policy, choice
from .plans import keep_mask, lowest_score_slot, top_k_mask


@dataclass
class TOVAPolicy(Policy):
    """TOVA, token omission via attention (Oren et al., 2024): a multi-state RNN view.

    Prefill: keep the entries the last prompt token attends to most (mean over heads).
    Decoding: after each step, while over budget, drop the entry the newest token attends
    to least (the newest entry included).

    Parameters
    ----------
    budget : float, default 0.5
    heads : {"mean", "each"}, default "mean"
        One selection per layer from the heads' mean (TOVA), or one per KV head.
    """

    budget: float = 0.5
    heads: str = "mean"

    name: ClassVar[str] = "tova"
    summary: ClassVar[str] = "keeps the entries the newest token attends to most, at every step"
    scores_decode = True
    scores_prefill = True

    def __post_init__(self):
        super().__post_init__()
        choice("heads", self.heads, HEADS)

    @property
    def per_head(self):
        return self.heads == "each"

    def score(self, query, key, scaling):
        return scoring.attention_received(query[:, :, -1:], key, scaling, per_head=self.per_head)

    def plan_prefill(self, scores, prompt):
        return keep_mask(top_k_mask(scores, self.prompt_keep(prompt)), prompt)

    def accumulate(self, accumulated, received):
        return received  # only the newest token's attention counts

    def decode_victim(self, view: Decode):
        return lowest_score_slot(view, view.accumulated, torch.ones_like(view.positions, dtype=torch.bool))
