"""The policy interface, and the full cache (the policy that keeps everything).

A policy only decides; the cache layer (:mod:`elastic.cache`) moves the tensors. Like
kvpress, each policy splits its work in two:

* ``score`` -- the importance of every prompt position, from the prefill's queries and
  keys (``None``: the policy needs no attention);
* ``plan_prefill`` -- from the scores, which prompt positions survive and which entry each
  other position is folded into; then, once the cache is over budget while decoding,
  ``decode_victim`` picks the slot to drop.

Decisions are made on original positions (``layer.positions``, ``layer.slot_of_rank``),
never on slot order, which a preallocated layer permutes. A policy that selects per KV
head (``per_head``) sees one *row* per (sample, KV head): the cache then keeps a
separate set of positions for each head.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import scoring
from ..budget import check_budget, keep_count


HEADS = ("each", "mean")  # a KV head keeps its own entries, or one selection from the heads' mean


@dataclass
class Prefill:
    """What a policy knows about the prompt when it plans the prefill.

    Attributes
    ----------
    length : int
        T, prompt tokens.
    rows : int
        Independent selections: samples x KV heads for a per-head policy, else samples.
    device : torch.device
    spans : dict or None
        Token-type spans ``name -> (start, end)`` (see :class:`elastic.Trace`).
    keys : torch.Tensor or None
        ``[rows, heads, T, D]`` the prompt's stored keys (after RoPE), for policies that
        cluster them.
    budget : float or None
        This layer's own budget, for a policy with one budget per layer (None: the
        policy's budget).
    """

    length: int
    rows: int
    device: torch.device
    spans: dict | None = None
    keys: torch.Tensor | None = None
    budget: float | None = None

    def positions(self) -> torch.Tensor:
        return torch.arange(self.length, device=self.device).expand(self.rows, -1)


def choice(name: str, value, options) -> str:
    """``value`` if it is one of ``options``, else a ``ValueError`` that lists them."""
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value


def whole(name: str, value, minimum: int | None = None) -> int:
    """``value`` as an int if it is a whole number (>= ``minimum``), else a ``ValueError``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and int(value) == value
    if not ok or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be an integer{bound}, got {value!r}")
    return int(value)


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
    summary: ClassVar[str] = "keeps every entry"

    def __post_init__(self):
        self.budget = check_budget(self.budget)
        self.start_size = whole("start_size", self.start_size, 0)

    # -- what the cache asks (a policy whose answer is fixed sets a plain class attribute) ---
    @property
    def scores_prefill(self) -> bool:
        """Needs the prompt's attention at the prefill."""
        return False

    @property
    def scores_decode(self) -> bool:
        """Needs the attention each decode query pays (kept per entry in ``layer.accumulated``)."""
        return False

    @property
    def per_head(self) -> bool:
        """Selects separately for every KV head (the cache keeps one row per head)."""
        return False

    @property
    def shared_across_layers(self) -> bool:
        """One score for all layers: the prefill is planned once every layer has attended."""
        return False

    @property
    def budgets_per_layer(self) -> bool:
        """Gives every layer its own budget from the whole prompt (:meth:`layer_budgets`): the
        prefill is planned once every layer has attended."""
        return False

    def options(self) -> dict:
        """The policy's parameters (what the trace records as the variant that ran)."""
        return dataclasses.asdict(self)

    def variant(self) -> dict:
        """The options that differ from the method's defaults, budget and sinks aside
        (``{}``: the method as its paper describes it)."""
        main = {"budget", "start_size", "distance"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in main and getattr(self, f.name) != f.default}

    # -- budget -----------------------------------------------------------------------
    def sinks(self, prompt_length: int) -> int:
        """How many leading prompt tokens are sinks: ``start_size``, or the whole prompt if
        it is shorter (generated tokens are never sinks)."""
        return min(self.start_size, prompt_length)

    def protected(self, prompt_length: int, spans: dict | None = None) -> list[int]:
        """Prompt positions that are never merged or evicted at the prefill."""
        return []

    def min_entries(self, prompt_length: int, spans: dict | None = None) -> int:
        """Fewest entries the policy can work with (protected entries plus one more)."""
        return len(self.protected(prompt_length, spans)) + 1

    def capacity(self, tokens_seen: int, prompt_length: int, spans: dict | None = None,
                 budget: float | None = None) -> int:
        """Entries a layer (whose own budget is ``budget``, default the policy's) may hold
        after ``tokens_seen`` tokens."""
        return keep_count(self.budget if budget is None else budget, tokens_seen,
                          self.min_entries(prompt_length, spans))

    def prompt_keep(self, prompt: Prefill) -> int:
        """Entries kept right after the prefill: ``ceil(budget * T)``, never below the minimum."""
        budget = self.budget if prompt.budget is None else prompt.budget
        return keep_count(budget, prompt.length, self.min_entries(prompt.length, prompt.spans))

    def layer_budgets(self, stats: list, prompt_length: int, spans: dict | None = None) -> list[float]:
        """One budget per layer from every layer's prefill statistic (``stats[l]``, what
        :meth:`prefill_scores` returned as its second value), for :attr:`budgets_per_layer`."""
        raise NotImplementedError(f"{self.name} has one budget for all layers")

    # -- decisions --------------------------------------------------------------------
    def score(self, query: torch.Tensor, key: torch.Tensor, scaling: float | None) -> torch.Tensor | None:
        """Prompt importance ``[B, T]`` (``[B, H_kv, T]`` per head) from the prefill's attention."""
        return None

    def prefill_scores(self, query, key, scaling, spans: dict | None = None):
        """``(scores, statistic)`` of one layer's prefill: :meth:`score`, and what
        :meth:`layer_budgets` needs from this layer (None for a policy with one budget)."""
        return self.score(query, key, scaling), None

    def plan_prefill(self, scores: torch.Tensor | None, prompt: Prefill) -> torch.Tensor:
        """Return ``group`` ``[rows, T]``: the original position each prompt position ends in.

        ``group[r, t] == t`` keeps ``t``; another position folds ``t`` into that entry (the
        entry becomes the mean of everything folded into it); ``-1`` evicts ``t``.
        """
        return prompt.positions().clone()

    def initial_accumulated(self, scores: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """Per-entry score ``[rows, S]`` the kept entries start decoding with: their own prefill score."""
        return scores.gather(1, kept)

    def decode_score(self, query, key, scaling) -> torch.Tensor:
        """Attention this decode step pays each entry, ``[rows, S]`` in slot order."""
        received = scoring.attention_received(query, key, scaling, per_head=self.per_head)
        return received.flatten(0, 1) if self.per_head else received

    def accumulate(self, accumulated: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
        """New per-entry score after a decode step (H2O: the running sum)."""
        return accumulated + received

    def decode_victim(self, layer) -> torch.Tensor:
        """Slot index ``[rows]`` to remove from an over-budget ``layer`` while decoding.

        "The entry at index i" of the paper means the entry with the i-th smallest
        original position (``layer.slot_of_rank(i)``): slots may be in any order.
        """
        raise NotImplementedError(f"{self.name} never evicts")


def keep_mask(keep: torch.Tensor, prompt: Prefill) -> torch.Tensor:
    """``group`` for a policy that only keeps or evicts: kept positions map to themselves."""
    positions = prompt.positions()
    return torch.where(keep, positions, torch.full_like(positions, -1))


def top_k(scores: torch.Tensor, k: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """``[rows, k]`` positions of the ``k`` highest scores of each row (among ``allowed``).

    A tie goes to the earlier position (a stable sort; ``torch.topk`` leaves ties to the
    kernel, and pooled or uniform scores do tie).
    """
    scores = scores.float()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.sort(dim=-1, descending=True, stable=True).indices[:, :k]


def top_k_mask(scores: torch.Tensor, k: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """``[rows, T]`` True for the :func:`top_k` positions."""
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top_k(scores, k, allowed), True)


def lowest_score_slot(layer, score: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Slot ``[rows]`` with the lowest ``score`` among ``candidates``; a tie goes to the
    oldest entry, whatever the slot order."""
    score = score.masked_fill(~candidates, float("inf"))
    positions = layer.positions
    tied = score == score.min(dim=-1, keepdim=True).values
    return torch.where(tied, positions, torch.iinfo(positions.dtype).max).argmin(dim=-1)


def nearest_by_cosine(targets: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``[rows, T]`` for every position, the target position whose key is the most
    cosine-similar to its own (over all heads of the row; a tie goes to the earlier target).

    ``targets`` ``[rows, k]`` ascending positions; ``keys`` ``[rows, heads, T, D]``. A
    target is its own nearest. LOOK-M's pivot merge, and Elastic's ``prefill="similar"``.
    """
    R, H, T, D = keys.shape
    x = torch.nn.functional.normalize(keys.permute(0, 2, 1, 3).reshape(R, T, H * D).float(), dim=-1)
    centres = x.gather(1, targets[:, :, None].expand(-1, -1, H * D))
    similarity = x @ centres.transpose(1, 2)  # [R, T, k]
    best = targets.gather(1, similarity.argmax(dim=-1))  # argmax: the first maximum, the earlier target
    is_target = torch.zeros(R, T, dtype=torch.bool, device=keys.device).scatter_(1, targets, True)
    return torch.where(is_target, torch.arange(T, device=keys.device).expand(R, -1), best)
