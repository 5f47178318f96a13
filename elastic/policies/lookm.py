"""LOOK-M (Wan et al., EMNLP Findings 2024): text first, and evicted entries merged by similarity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import scoring
from ..spans import SPANS_HOW
from .base import HEADS, choice
from .h2o import H2OPolicy
from .plans import nearest_by_cosine

MERGES = ("pivot", "evict")


@dataclass
class LOOKMPolicy(H2OPolicy):
    """LOOK-M, look-once KV merging for multimodal prompts (Wan et al., EMNLP Findings 2024).

    Prefill, per KV head: H2O's scores (attention received, summed over the prompt's
    queries, mean over the query heads that share the KV head) with a *text prior*: every
    text position ranks above every image position (the ``image`` span), by score within
    each. The budget is split between the most recent entries (``recent_ratio``) and the
    best-ranked older ones. Every other entry is not lost but merged ("pivot" merge): its
    key and value are averaged into the kept entry whose key is the most cosine-similar
    (the kept entry becomes the mean of its group, as Elastic's merge). While decoding:
    H2O's rule per KV head.

    Parameters
    ----------
    budget : float, default 0.5
    recent_ratio : float, default 0.5
        Share of the budget kept as the most recent entries (H2O's half and half).
    text_prior : bool, default True
        Rank text above the image (False: H2O's ranking).
    merge : {"pivot", "evict"}, default "pivot"
        Merge every dropped entry into its most similar kept entry, or drop it (H2O per head).
    heads : {"each", "mean"}, default "each"
        Each KV head keeps and merges its own entries (LOOK-M), or one selection per
        layer from the heads' mean (similarity then over all heads' keys).

    Notes
    -----
    LOOK-M's code offers three merges (average, pivot, weighted); this is the pivot merge
    with a plain mean, so the group a kept entry holds is recorded like Elastic's anchors.
    """

    text_prior: bool = True
    merge: str = "pivot"
    heads: str = "each"

    name: ClassVar[str] = "lookm"
    summary: ClassVar[str] = "text before image, and every dropped entry merged into its most similar kept one"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.text_prior, bool):
            raise ValueError(f"text_prior must be True or False, got {self.text_prior!r}")
        choice("merge", self.merge, MERGES)
        choice("heads", self.heads, HEADS)

    @property
    def per_head(self):
        return self.heads == "each"

    def score(self, query, key, scaling):
        return scoring.attention_received(query, key, scaling, per_head=self.per_head)

    def plan_prefill(self, scores, prompt):
        T, n_keep = prompt.length, self.prompt_keep(prompt)
        positions = prompt.positions()
        if n_keep >= T:
            return positions.clone()
        recent = self.recent_size(n_keep)
        older = positions < T - recent
        # Rank by score (stable: a tie goes to the earlier position), then by tier: older
        # text, older image (the text prior), then the recent window, which is kept anyway.
        order = scores.float().sort(dim=-1, descending=True, stable=True).indices
        tier = (~older).long() * 2
        if self.text_prior and prompt.spans is None:
            raise ValueError(f"lookm's text prior needs the prompt's token spans: {SPANS_HOW}; "
                             "or pass text_prior=False")
        image = prompt.spans.get("image") if self.text_prior else None
        if image is not None:
            tier = tier + ((positions >= image[0]) & (positions < image[1]) & older).long()
        order = order.gather(1, tier.gather(1, order).sort(dim=-1, stable=True).indices)
        heavy = order[:, : n_keep - recent]
        kept = torch.cat([heavy, positions[:, T - recent:]], dim=1).sort(dim=-1).values
        if self.merge == "evict":
            keep = torch.zeros_like(positions, dtype=torch.bool).scatter_(1, kept, True)
            return torch.where(keep, positions, torch.full_like(positions, -1))
        return nearest_by_cosine(kept, prompt.keys)
