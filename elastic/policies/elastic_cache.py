"""Elastic Cache (Liu et al., ECCV 2024) and its ablations, as one policy with options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import scoring
from ..spans import SPANS_HOW
from .base import Decode, Policy, Prefill, choice, whole
from .plans import fixed_point_index, fixed_point_slot, keep_mask, lowest_score_slot, nearest_by_cosine, top_k

IMPORTANCE = ("sum", "mean", "moving-average", "debiased", "uniform")
SCOPES = ("layer", "shared", "head")
PREFILLS = ("merge", "evict", "kmeans", "similar")
DECODES = ("fixed-point", "recent", "lowest-frequency")
PROTECTS = ("none", "instruction", "last")
KMEANS_ITERATIONS = 5


@dataclass
class ElasticPolicy(Policy):
    """Elastic Cache (Liu et al., ECCV 2024): importance-driven merging, then a fixed point.

    Prefill: per layer, the top-k prompt tokens by attention received become anchors
    (``start_size`` sinks and the last prompt token are protected and kept as they are);
    every other token is merged into its nearest anchor by position (ties to the earlier
    anchor), the anchor's key and value becoming the plain mean of its group.
    Decoding: while over budget, drop the entry at the fixed slot
    ``N_tl = compressed prompt length + distance`` (clamped to ``>= start_size``), so a
    compressed prompt head stays and a window of recent tokens slides behind it.

    The defaults are the paper's method; the other values are its ablations (Table 4 of
    the paper, budget 0.5) and three controls of ours.

    Parameters
    ----------
    budget : float, default 0.5
    start_size : int, default 1
    distance : int, default -25
        Offset of the fixed eviction point from the end of the compressed prompt.
    importance : {"sum", "mean", "moving-average", "debiased", "uniform"}, default "sum"
        A token's score: the attention it receives summed over the prompt's queries
        (paper); that sum divided by the number of queries that see the token ("mean");
        an exponential moving average over the queries in order, weight
        ``(1 - ema_decay) * ema_decay ** (T - 1 - i)`` for query ``i`` ("moving-average");
        the sum divided by what uniform causal attention would give the token,
        ``sum_{i >= j} 1 / (i + 1)`` (ours, "debiased": removes the head start of early
        tokens); or no score at all, anchors evenly spaced over the unprotected tokens
        (ours, "uniform": a control for whether the score helps).
    scope : {"layer", "shared", "head"}, default "layer"
        One score per layer, averaged over heads (paper); one score for all layers (the
        mean of the layers' scores; every layer keeps the same positions); or one per KV
        head (each head keeps its own anchors).
    prefill : {"merge", "evict", "kmeans", "similar"}, default "merge"
        What happens to non-anchors: merged into the nearest anchor by position (paper);
        evicted; merged by k-means on the keys: the anchors' keys seed the centroids,
        every other token joins its nearest centroid (Euclidean, over all heads of the
        row), and centroids move to their members' mean, for 5 rounds; or merged into
        the anchor whose key is the most cosine-similar (over all heads of the row;
        LOOK-M's pivot merge, with Elastic's anchors).
    decode : {"fixed-point", "recent", "lowest-frequency"}, default "fixed-point"
        Decode-time victim: the entry at N_tl (paper); the newest entry; or the entry
        with the lowest attention accumulated since the prefill (sinks excepted; each
        entry starts from its prefill score, a tie goes to the oldest entry). With
        ``importance="uniform"`` there is no prefill score: every entry starts at 0, all
        equal, so only the attention paid while decoding tells them apart.
    protect : {"none", "instruction", "last"}, default "none"
        Also keep, unmerged, the last user turn ("instruction": the trace's
        ``instruction`` span, which :func:`elastic.generate` fills) or the last
        ``protect_last`` prompt tokens (ours). Protected tokens count against the budget.
    protect_last : int, default 8
    ema_decay : float, default 0.9
    """

    budget: float = 0.5
    distance: int = -25
    importance: str = "sum"
    scope: str = "layer"
    prefill: str = "merge"
    decode: str = "fixed-point"
    protect: str = "none"
    protect_last: int = 8
    ema_decay: float = 0.9

    name: ClassVar[str] = "elastic"
    summary: ClassVar[str] = "merges unimportant prompt entries into anchors, then evicts at a fixed point"

    def __post_init__(self):
        super().__post_init__()
        self.distance = whole("distance", self.distance)
        choice("importance", self.importance, IMPORTANCE)
        choice("scope", self.scope, SCOPES)
        choice("prefill", self.prefill, PREFILLS)
        choice("decode", self.decode, DECODES)
        choice("protect", self.protect, PROTECTS)
        self.protect_last = whole("protect_last", self.protect_last, 0)
        if not isinstance(self.ema_decay, (int, float)) or not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay!r}")

    @property
    def scores_prefill(self):
        return self.importance != "uniform"

    @property
    def scores_decode(self):
        return self.decode == "lowest-frequency"

    @property
    def per_head(self):
        return self.scope == "head"

    @property
    def shared_across_layers(self):
        return self.scope == "shared"

    # -- budget -----------------------------------------------------------------------
    def protected(self, prompt_length, spans=None):
        T = prompt_length
        sinks = set(range(self.sinks(T)))
        extra = set()
        if self.protect == "last":
            extra = set(range(max(0, T - self.protect_last), T))
        elif self.protect == "instruction":
            extra = set(range(*instruction_span(spans, T)))
        last = {T - 1} if T - 1 >= len(sinks) else set()
        return sorted(sinks | extra | last)

    def fixed_point(self, prompt_entries: int, prompt_length: int | None = None) -> int:
        """Slot index N_tl evicted while decoding, for a prompt of ``prompt_length`` tokens
        compressed to ``prompt_entries``: never one of the sinks."""
        sinks = self.start_size if prompt_length is None else self.sinks(prompt_length)
        return fixed_point_index(prompt_entries, sinks, self.distance)

    # -- score ------------------------------------------------------------------------
    def score(self, query, key, scaling):
        if self.importance == "uniform":
            return None
        q, S = query.shape[-2], key.shape[-2]
        weights = None
        if self.importance == "moving-average":
            age = torch.arange(q - 1, -1, -1, device=query.device, dtype=torch.float32)
            weights = (1 - self.ema_decay) * self.ema_decay ** age
        scores = scoring.attention_received(query, key, scaling, weights=weights, per_head=self.per_head)
        rows = torch.arange(S - q, S, device=query.device, dtype=torch.float32)  # each query's key index
        cols = torch.arange(S, device=query.device, dtype=torch.float32)
        if self.importance == "mean":  # queries that see key j: those at index >= j
            scores = scores / (rows[None, :] >= cols[:, None]).sum(dim=1).clamp(min=1)
        elif self.importance == "debiased":  # uniform causal attention gives key j 1/(i+1) from query i
            expected = ((rows[None, :] >= cols[:, None]) / (rows[None, :] + 1)).sum(dim=1)
            scores = scores / expected.clamp(min=1e-12)
        return scores

    # -- prefill ----------------------------------------------------------------------
    def anchors(self, scores, prompt: Prefill, protected: torch.Tensor, n_anchors: int) -> torch.Tensor:
        """``[rows, k]`` ascending anchor positions among the unprotected tokens."""
        if self.importance == "uniform":
            candidates = torch.arange(prompt.length, device=prompt.device)[~protected]
            n = len(candidates)
            pick = ((torch.arange(n_anchors, device=prompt.device) + 0.5) * n / n_anchors).long()
            return candidates[pick].expand(prompt.rows, -1)
        # True top-k over the unprotected tokens, then sorted by position (SPEC 2: the
        # reference code ranks argsort positions instead, which keeps a near-random set).
        return top_k(scores, n_anchors, ~protected).sort(dim=-1).values

    def plan_prefill(self, scores, prompt):
        T = prompt.length
        n_keep = self.prompt_keep(prompt)
        positions = prompt.positions()
        if n_keep >= T:
            return positions.clone()
        protected = torch.zeros(T, dtype=torch.bool, device=prompt.device)
        protected[self.protected(T, prompt.spans)] = True
        anchors = self.anchors(scores, prompt, protected, n_keep - int(protected.sum()))
        if self.prefill == "evict":
            keep = protected.expand(prompt.rows, -1).clone()
            keep.scatter_(1, anchors, True)
            return keep_mask(keep, prompt)
        if self.prefill == "merge":
            group = nearest_by_position(anchors, positions, T)
        elif self.prefill == "similar":
            group = nearest_by_cosine(anchors, prompt.keys)
        else:
            group = nearest_by_key(anchors, prompt.keys, protected)
        return torch.where(protected, positions, group)

    # -- decoding ---------------------------------------------------------------------
    def decode_victim(self, view: Decode):
        if self.decode == "recent":
            return view.slot_of_rank(view.get_seq_length() - 1)
        if self.decode == "lowest-frequency":
            return lowest_score_slot(view, view.accumulated, view.positions >= self.sinks(view.prompt_length))
        return fixed_point_slot(view, self.fixed_point(view.prompt_entries, view.prompt_length))


def instruction_span(spans: dict | None, prompt_length: int) -> tuple[int, int]:
    """The ``instruction`` span: the last user turn and the generation prompt."""
    if not spans or "instruction" not in spans:
        raise ValueError(
            "protect='instruction' needs the prompt's token spans: " + SPANS_HOW
        )
    start, end = spans["instruction"]
    return max(0, start), min(prompt_length, end)


def nearest_by_position(anchors: torch.Tensor, positions: torch.Tensor, T: int) -> torch.Tensor:
    """``[rows, T]`` the nearest anchor of every position; a tie goes to the earlier anchor."""
    n = anchors.shape[1]
    anchors = anchors.contiguous()  # the uniform anchors are an expanded view
    after = torch.searchsorted(anchors, positions.contiguous())  # first anchor >= t
    left, right = (after - 1).clamp(min=0), after.clamp(max=n - 1)
    a_left, a_right = anchors.gather(1, left), anchors.gather(1, right)
    d_left = torch.where(a_left <= positions, positions - a_left, torch.full_like(positions, T))
    d_right = torch.where(a_right >= positions, a_right - positions, torch.full_like(positions, T))
    return torch.where(d_left <= d_right, a_left, a_right)


def nearest_by_key(anchors: torch.Tensor, keys: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """``[rows, T]`` k-means on the keys, seeded by the anchors (each anchor stays in its own
    cluster); every position maps to its cluster's anchor."""
    R, H, T, D = keys.shape
    x = keys.permute(0, 2, 1, 3).reshape(R, T, H * D).float()  # one feature vector per position
    is_anchor = torch.zeros(R, T, dtype=torch.bool, device=keys.device).scatter_(1, anchors, True)
    own = torch.full((R, T), -1, dtype=torch.long, device=keys.device)
    own.scatter_(1, anchors, torch.arange(anchors.shape[1], device=keys.device).expand(R, -1))
    centroids = x.gather(1, anchors[:, :, None].expand(-1, -1, H * D))
    for _ in range(KMEANS_ITERATIONS):
        cluster = torch.cdist(x, centroids).argmin(dim=-1)  # [R, T]
        cluster = torch.where(is_anchor, own, cluster)
        members = torch.where(protected, anchors.shape[1], cluster)  # protected tokens join none
        sums = torch.zeros(R, anchors.shape[1] + 1, H * D, device=keys.device).scatter_add_(
            1, members[:, :, None].expand(-1, -1, H * D), x)
        counts = torch.zeros(R, anchors.shape[1] + 1, device=keys.device).scatter_add_(
            1, members, torch.ones_like(members, dtype=torch.float32))
        centroids = sums[:, :-1] / counts[:, :-1, None]
    return anchors.gather(1, cluster)
