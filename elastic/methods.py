"""KV-cache policies: one small dataclass per method, and a registry of named methods.

Each policy answers two questions, and only decides (the cache layer moves the tensors):

* :meth:`Policy.plan_prefill` -- given the prompt's importance scores, which prompt
  positions survive the prefill and which entry each other position is folded into;
* :meth:`Policy.decode_victim` -- once the cache is over budget while decoding, which slot
  to drop. Decisions are made on original positions (``layer.positions``,
  ``layer.slot_of_rank``), never on slot order, which a preallocated layer permutes.

The budget arithmetic lives in :mod:`elastic.budget`; the scores come from
:mod:`elastic.scoring`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .budget import check_budget, keep_count


@dataclass
class Policy:
    """Base policy: keep everything (the full cache).

    Parameters
    ----------
    budget : float, default 1.0
        Fraction of KV entries kept, over all tokens seen so far, in (0, 1].
    start_size : int, default 1
        Leading "attention sink" tokens that are always kept (methods that use them).
    """

    budget: float = 1.0
    start_size: int = 1

    name: ClassVar[str] = "full"
    scores_prefill: ClassVar[bool] = False  # needs prompt importance at the prefill
    scores_decode: ClassVar[bool] = False  # needs the attention each decode query pays

    def __post_init__(self):
        self.budget = check_budget(self.budget)
        if int(self.start_size) != self.start_size or self.start_size < 0:
            raise ValueError(f"start_size must be an integer >= 0, got {self.start_size!r}")
        self.start_size = int(self.start_size)

    # -- budget ------------------------------------------------------------------------
    def protected(self, prompt_length: int) -> list[int]:
        """Prompt positions that are never merged or evicted at the prefill."""
        return []

    def min_entries(self, prompt_length: int) -> int:
        """Fewest entries the policy can work with (protected entries plus one more)."""
        return len(self.protected(prompt_length)) + 1

    def capacity(self, tokens_seen: int, prompt_length: int) -> int:
        """Entries a layer may hold after ``tokens_seen`` tokens."""
        return keep_count(self.budget, tokens_seen, self.min_entries(prompt_length))

    # -- decisions ---------------------------------------------------------------------
    def plan_prefill(self, scores: torch.Tensor | None, prompt_length: int, batch: int, device) -> torch.Tensor:
        """Return ``group`` ``[B, T]``: the original position each prompt position ends in.

        ``group[b, t] == t`` keeps ``t``; another position folds ``t`` into that entry (the
        entry becomes the mean of everything folded into it); ``-1`` evicts ``t``.
        """
        return torch.arange(prompt_length, device=device).expand(batch, -1)

    def decode_victim(self, layer) -> torch.Tensor:
        """Slot index ``[B]`` to remove from an over-budget ``layer`` while decoding.

        "The entry at index i" of the paper means the entry with the i-th smallest
        original position (``layer.slot_of_rank(i)``): slots may be in any order.
        """
        raise NotImplementedError(f"{self.name} never evicts")


def _positions(n: int, batch: int, device) -> torch.Tensor:
    return torch.arange(n, device=device).expand(batch, -1)


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

    Parameters
    ----------
    budget : float, default 0.5
    start_size : int, default 1
    distance : int, default -25
        Offset of the fixed eviction point from the end of the compressed prompt.
    """

    budget: float = 0.5
    distance: int = -25

    name: ClassVar[str] = "elastic"
    scores_prefill: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if int(self.distance) != self.distance:
            raise ValueError(f"distance must be an integer, got {self.distance!r}")
        self.distance = int(self.distance)

    def protected(self, prompt_length: int) -> list[int]:
        sinks = list(range(min(self.start_size, prompt_length)))
        last = [prompt_length - 1] if prompt_length - 1 >= len(sinks) else []
        return sinks + last

    def fixed_point(self, prompt_entries: int) -> int:
        """Slot index N_tl evicted while decoding, for a prompt compressed to ``prompt_entries``."""
        return max(self.start_size, prompt_entries + self.distance)

    def plan_prefill(self, scores, prompt_length, batch, device):
        T = prompt_length
        n_keep = keep_count(self.budget, T, self.min_entries(T))
        positions = _positions(T, batch, device)
        if n_keep >= T:
            return positions.clone()
        protected = torch.zeros(T, dtype=torch.bool, device=device)
        protected[self.protected(T)] = True
        # True top-k over the unprotected tokens, then sorted by position (SPEC 2: the
        # reference code ranks argsort positions instead, which keeps a near-random set).
        candidates = scores.float().masked_fill(protected, float("-inf"))
        n_anchors = n_keep - int(protected.sum())
        anchors = candidates.topk(n_anchors, dim=-1).indices.sort(dim=-1).values  # [B, k]
        # Nearest anchor by position: the last anchor at or before t versus the first after.
        after = torch.searchsorted(anchors, positions.contiguous())  # first anchor >= t
        left, right = (after - 1).clamp(min=0), after.clamp(max=n_anchors - 1)
        a_left, a_right = anchors.gather(1, left), anchors.gather(1, right)
        d_left = torch.where(a_left <= positions, positions - a_left, torch.full_like(positions, T))
        d_right = torch.where(a_right >= positions, a_right - positions, torch.full_like(positions, T))
        group = torch.where(d_left <= d_right, a_left, a_right)  # a tie goes to the earlier anchor
        return torch.where(protected, positions, group)

    def decode_victim(self, layer):
        return layer.slot_of_rank(min(self.fixed_point(layer.prompt_entries), layer.get_seq_length() - 1))


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
    scores_prefill: ClassVar[bool] = True
    scores_decode: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(f"recent_ratio must be in [0, 1], got {self.recent_ratio!r}")

    def recent_size(self, capacity: int) -> int:
        return min(capacity - 1, int(capacity * self.recent_ratio))

    def plan_prefill(self, scores, prompt_length, batch, device):
        T = prompt_length
        n_keep = keep_count(self.budget, T, self.min_entries(T))
        positions = _positions(T, batch, device)
        if n_keep >= T:
            return positions.clone()
        recent = self.recent_size(n_keep)
        older = scores.float()[:, : T - recent]
        heavy = older.topk(n_keep - recent, dim=-1).indices
        keep = torch.zeros(batch, T, dtype=torch.bool, device=device)
        keep[:, T - recent :] = True
        keep.scatter_(1, heavy, True)
        return torch.where(keep, positions, torch.full_like(positions, -1))

    def decode_victim(self, layer):
        recent = self.recent_size(layer.capacity())
        positions = layer.positions
        # Older than the recent window: at most the (S - recent)-th smallest position.
        newest_old = positions.gather(1, layer.slot_of_rank(layer.get_seq_length() - recent - 1)[:, None])
        score = layer.accumulated.masked_fill(positions > newest_old, float("inf"))
        # Lowest score; a tie goes to the oldest entry, whatever the slot order.
        tied = score == score.min(dim=-1, keepdim=True).values
        return torch.where(tied, positions, torch.iinfo(positions.dtype).max).argmin(dim=-1)


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

    def protected(self, prompt_length: int) -> list[int]:
        return list(range(min(self.start_size, prompt_length)))

    def plan_prefill(self, scores, prompt_length, batch, device):
        T = prompt_length
        n_keep = keep_count(self.budget, T, self.min_entries(T))
        positions = _positions(T, batch, device)
        keep = (positions < self.start_size) | (positions >= T - (n_keep - len(self.protected(T))))
        return torch.where(keep, positions, torch.full_like(positions, -1))

    def decode_victim(self, layer):
        return layer.slot_of_rank(self.start_size)


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (Policy, ElasticPolicy, H2OPolicy, LocalPolicy)}
METHODS: tuple[str, ...] = tuple(POLICIES)


def make_policy(method: str, **params) -> Policy:
    """Build the named policy; unknown methods and parameters raise ``ValueError``."""
    if method not in POLICIES:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    cls = POLICIES[method]
    # A parameter of another method (say ``distance`` for h2o) is ignored so that callers
    # can pass one set of controls to every method; a name no method knows is a typo.
    known = set().union(*(p.__dataclass_fields__ for p in POLICIES.values()))
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown}; known: {sorted(known)}")
    params = {k: v for k, v in params.items() if k in cls.__dataclass_fields__}
    if method == "full" and params.get("budget", 1.0) != 1.0:
        check_budget(params["budget"])  # still reject nonsense, but full keeps everything
        params = {**params, "budget": 1.0}
    return cls(**params)
