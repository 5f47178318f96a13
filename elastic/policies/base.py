"""The policy interface, and the full cache (the policy that keeps everything).

A policy only decides; the cache layer (:mod:`elastic.cache`) moves the tensors. Like
kvpress, each policy splits its work in two:

* ``score`` -- the importance of every prompt position, from the prefill's queries and
  keys (``None``: the policy needs no attention);
* ``plan_prefill`` -- from the scores, which prompt positions survive and which entry each
  other position is folded into; then, once the cache is over budget while decoding,
  ``decode_victim`` picks the slot to drop.

A policy never sees the cache: the prefill is described by a :class:`Prefill`, a decode
step by a :class:`Decode` view of one layer. Decisions are made on original positions
(``view.positions``, ``view.slot_of_rank``), never on slot order, which a preallocated
layer permutes. A policy that selects per KV head (``per_head``) sees one *row* per
(sample, KV head): the cache then keeps a separate set of positions for each head. The
rules several policies share are plain functions in :mod:`.plans`.
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


@dataclass
class Decode:
    """What a policy knows about one layer when it picks a decode victim.

    The cache layer builds it (``layer.decode_view``) each time it is over budget; the
    method names are a cache layer's (``get_seq_length``, ``capacity``, ``slot_of_rank``), so
    a victim rule reads as the paper's "drop the entry at index i" does.

    Attributes
    ----------
    layer_idx : int
        The decoder layer.
    positions : torch.Tensor
        ``[rows, S]`` original position of the entry in each slot.
    accumulated : torch.Tensor or None
        ``[rows, S]`` each entry's decode score (:meth:`Policy.accumulate`), for a policy
        that :attr:`~Policy.scores_decode`; else None.
    seen : int
        Tokens seen so far (prompt and generated).
    prompt_length : int
        T, prompt tokens.
    prompt_entries : int
        Entries the layer kept right after the prefill.
    max_entries : int
        Entries the layer may hold now (:meth:`Policy.capacity` for its budget).
    budget : float or None
        This layer's own budget (per-layer policies), else None: the policy's.
    ordered : bool
        Slots are in position order (the ``"dynamic"`` layout); the ``"preallocated"``
        layout permutes them.
    """

    layer_idx: int
    positions: torch.Tensor
    accumulated: torch.Tensor | None
    seen: int
    prompt_length: int
    prompt_entries: int
    max_entries: int
    budget: float | None = None
    ordered: bool = False

    def get_seq_length(self) -> int:
        """Entries held, S."""
        return self.positions.shape[-1]

    def capacity(self) -> int:
        """Entries the layer may hold now."""
        return self.max_entries

    def slot_of_rank(self, rank: int) -> torch.Tensor:
        """Slot ``[rows]`` of each row's entry with the ``rank``-th smallest original position."""
        if self.ordered:  # slot i holds the i-th position: no search
            return torch.full((self.positions.shape[0],), rank, dtype=torch.long, device=self.positions.device)
        return self.positions.kthvalue(rank + 1, dim=1).indices


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
        """Needs the attention each decode query pays (kept per entry, :attr:`Decode.accumulated`)."""
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

    def initial_accumulated(self, scores: torch.Tensor | None, kept: torch.Tensor) -> torch.Tensor:
        """Per-entry score ``[rows, S]`` the kept entries start decoding with: their own prefill
        score, or 0 for every entry when the prefill scored nothing (``scores`` None: all
        entries equal, so only what decoding adds tells them apart)."""
        if scores is None:
            return torch.zeros(kept.shape, dtype=torch.float32, device=kept.device)
        return scores.gather(1, kept)

    def decode_score(self, query, key, scaling) -> torch.Tensor:
        """Attention this decode step pays each entry, ``[rows, S]`` in slot order."""
        received = scoring.attention_received(query, key, scaling, per_head=self.per_head)
        return received.flatten(0, 1) if self.per_head else received

    def accumulate(self, accumulated: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
        """New per-entry score after a decode step (H2O: the running sum)."""
        return accumulated + received

    def decode_victim(self, view: Decode) -> torch.Tensor:
        """Slot index ``[rows]`` to remove from an over-budget layer while decoding.

        "The entry at index i" of the paper means the entry with the i-th smallest
        original position (``view.slot_of_rank(i)``): slots may be in any order.
        """
        raise NotImplementedError(f"{self.name} never evicts")
