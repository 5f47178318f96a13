"""PrefixKV (Wang et al., NeurIPS 2025): one retention threshold, a budget per layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .. import scoring
from ..budget import distribute, layer_ratio, layer_total, mass_threshold_counts
from .base import Decode, Policy, whole
from .plans import fixed_point_index, fixed_point_slot, keep_mask, top_k_mask


@dataclass
class PrefixKVPolicy(Policy):
    """PrefixKV (Wang et al., NeurIPS 2025; THU-MIG/PrefixKV, built on Elastic Cache's code).

    Every layer scores the prompt like H2O (attention received, summed over the prompt's
    queries, mean over heads) and keeps a *prefix* of its positions sorted by score. How
    long a prefix is set per layer: one threshold ``p`` on the cumulative share of each
    layer's attention mass is shared by all layers, and searched so that all layers
    together keep the budget's total, ``ceil(budget * layers * T)`` entries
    (:func:`elastic.budget.layer_total`). A layer whose
    attention is concentrated reaches ``p`` with few entries and gives the rest of its
    budget to layers whose attention is spread out. Entries are evicted, not merged; the
    ``start_size`` sinks and the last prompt token are always kept. While decoding, a layer
    holds its own ratio ``k_l / T`` with Elastic's fixed-point rule.

    Parameters
    ----------
    budget : float, default 0.5
        The average over layers; a layer keeps between its minimum and every entry.
    start_size : int, default 4
        Sinks (PrefixKV's code keeps 4 start tokens).
    distance : int, default -25
        Elastic's fixed eviction point, from the end of the layer's compressed prompt.
    ratios : tuple of float or None, default None
        Per-layer shares calibrated offline (:func:`elastic.calibrate.prefixkv_ratios`,
        the paper's shipped configuration): the total is then spread in proportion to
        them, prompt after prompt. ``None``: computed from each prompt (the search above).

    Notes
    -----
    The paper binary-searches ``p``; here the exact answer of that search is computed
    in one sort (:func:`elastic.budget.mass_threshold_counts`), so the total is met
    exactly rather than to the search's tolerance. A layer's mass curve is over the
    positions it may drop (the protected ones are kept anyway). In a batch, the layers'
    budgets come from the batch's mean scores (every sample keeps the same number of
    entries per layer; the entries themselves are chosen per sample).
    """

    budget: float = 0.5
    start_size: int = 4
    distance: int = -25
    ratios: tuple | None = None

    name: ClassVar[str] = "prefixkv"
    summary: ClassVar[str] = "one attention-mass threshold shared by all layers sets each layer's budget"
    scores_prefill = True
    budgets_per_layer = True

    def __post_init__(self):
        super().__post_init__()
        self.distance = whole("distance", self.distance)
        if self.ratios is not None:
            ratios = tuple(float(r) for r in self.ratios)
            if not ratios or min(ratios) < 0 or sum(ratios) <= 0:
                raise ValueError(f"ratios must be non-negative per-layer shares, not all zero; got {self.ratios!r}")
            self.ratios = ratios

    def protected(self, prompt_length, spans=None):
        sinks = list(range(self.sinks(prompt_length)))
        return sinks + ([prompt_length - 1] if prompt_length - 1 >= len(sinks) else [])

    def score(self, query, key, scaling):
        return scoring.attention_received(query, key, scaling)

    def prefill_scores(self, query, key, scaling, spans=None):
        scores = self.score(query, key, scaling)
        return scores, scores.mean(dim=0)  # the batch's mean sets the layer's budget

    def layer_budgets(self, stats, prompt_length, spans=None):
        T, minimum = prompt_length, self.min_entries(prompt_length, spans)
        total = layer_total(self.budget, T, len(stats), minimum)
        protected = self.protected(T, spans)
        if self.ratios is not None:
            if len(self.ratios) != len(stats):
                raise ValueError(f"ratios has {len(self.ratios)} layers, the model {len(stats)}")
            counts = distribute(total, self.ratios, minimum, T)
        else:
            free = [t for t in range(T) if t not in set(protected)]
            counts = mass_threshold_counts([s[free].tolist() for s in stats], total, minimum, len(protected))
        return [layer_ratio(k, T) for k in counts]

    def plan_prefill(self, scores, prompt):
        T, n_keep = prompt.length, self.prompt_keep(prompt)
        if n_keep >= T:
            return prompt.positions().clone()
        keep = top_k_mask(scores, 0)
        keep[:, self.protected(T, prompt.spans)] = True
        free = ~keep[0]
        keep |= top_k_mask(scores, n_keep - int(keep[0].sum()), free.expand_as(keep))
        return keep_mask(keep, prompt)

    def fixed_point(self, prompt_entries: int, prompt_length: int | None = None) -> int:
        """Elastic's N_tl for one layer: ``prompt_entries + distance``, never a sink."""
        sinks = self.start_size if prompt_length is None else self.sinks(prompt_length)
        return fixed_point_index(prompt_entries, sinks, self.distance)

    def decode_victim(self, view: Decode):
        return fixed_point_slot(view, self.fixed_point(view.prompt_entries, view.prompt_length))
