"""VL-Cache (Tu et al., ICLR 2025): the text after the image votes; sparse layers keep less."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .. import scoring
from ..budget import distribute, keep_count, layer_ratio, layer_total, share_count
from ..spans import SPANS_HOW
from .base import Policy, whole
from .plans import recent_and_top
from .tova import TOVAPolicy


@dataclass
class VLCachePolicy(Policy):
    """VL-Cache (Tu et al., ICLR 2025): sparsity-aware layer budgets, modality-aware scores.

    Prefill, per layer: the *post-vision* queries (the prompt's tokens after the last
    image token) score every entry by the attention they pay it (summed over those
    queries, mean over heads). The layer's sparsity ``s_l`` is the share of those rows'
    attention weights below ``threshold`` (1%) of their row's maximum, averaged over rows
    and heads. Dense layers get more: the budget of layer ``l`` is
    ``clamp((1 - s_l) / sum(1 - s) * budget * L, min_ratio, 1)``, renormalised so the total
    is the budget's (``ceil(budget * layers * T)`` entries, :func:`elastic.budget.layer_total`). A layer keeps its last
    ``recent_ratio`` of its budget as a recent window and the top-scoring rest.

    Parameters
    ----------
    budget : float, default 0.5
        The average over layers.
    recent_ratio : float, default 0.1
        Share of each layer's budget kept as the most recent entries (VL-Cache: 10%).
    threshold : float, default 0.01
        A weight counts as sparse below this fraction of its row's maximum.
    min_ratio : float, default 0.01
        A layer's budget never goes below this fraction of the prompt.
    window : int, default 32
        Without an ``image`` span (a text-only prompt, or none annotated), the last
        ``window`` prompt queries play the post-vision queries.
    hold_budget : bool, default True
        VL-Cache compresses the prompt once and lets the cache grow while decoding
        (False). To hold the budget while decoding, as the other methods here do, each
        step drops the entry the newest token attends to least (TOVA's rule, as for
        SnapKV); each layer holds its own ratio.

    Notes
    -----
    The clamp-and-renormalise is solved exactly (:func:`elastic.budget.distribute`: a
    clamped layer's surplus goes to the others) and rounded by largest remainder. In a
    batch, the layers' budgets come from the batch's mean sparsity.
    """

    budget: float = 0.5
    recent_ratio: float = 0.1
    threshold: float = 0.01
    min_ratio: float = 0.01
    window: int = 32
    hold_budget: bool = True

    name: ClassVar[str] = "vlcache"
    summary: ClassVar[str] = "the text after the image scores the entries; sparse layers keep fewer"
    scores_prefill = True
    budgets_per_layer = True

    def __post_init__(self):
        super().__post_init__()
        for name in ("recent_ratio", "threshold", "min_ratio"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        self.window = whole("window", self.window, 1)
        if not isinstance(self.hold_budget, bool):
            raise ValueError(f"hold_budget must be True or False, got {self.hold_budget!r}")

    @property
    def scores_decode(self):
        return self.hold_budget

    def post_vision_start(self, prompt_length: int, spans: dict | None) -> int:
        """First prompt query that votes: the one after the image, or the last ``window``."""
        if spans is None:
            raise ValueError("vlcache needs the prompt's token spans (the text after the image votes): " + SPANS_HOW)
        image = spans.get("image")
        if image is not None and image[1] < prompt_length:
            return image[1]
        return max(0, prompt_length - self.window)

    def score(self, query, key, scaling):
        return self.prefill_scores(query, key, scaling)[0]

    def prefill_scores(self, query, key, scaling, spans=None):
        T = key.shape[-2]
        voters = query[:, :, self.post_vision_start(T, spans):]
        scores = scoring.attention_received(voters, key, scaling)
        return scores, scoring.attention_sparsity(voters, key, scaling, self.threshold).mean()

    def layer_budgets(self, stats, prompt_length, spans=None):
        T, minimum = prompt_length, self.min_entries(prompt_length, spans)
        total = layer_total(self.budget, T, len(stats), minimum)
        density = [1.0 - float(s) for s in stats]
        lowest = keep_count(self.min_ratio, T, minimum)  # min_ratio of the prompt, never below the minimum
        counts = distribute(total, density, lowest, T)
        return [layer_ratio(k, T) for k in counts]

    def recent_size(self, capacity: int) -> int:
        """The recent window of a layer that may hold ``capacity`` entries."""
        return share_count(capacity, self.recent_ratio)

    def plan_prefill(self, scores, prompt):
        n_keep = self.prompt_keep(prompt)
        return recent_and_top(scores, prompt, n_keep, self.recent_size(n_keep))

    def capacity(self, tokens_seen, prompt_length, spans=None, budget=None):
        if not self.hold_budget:  # the prompt's entries, then every decoded token
            kept = keep_count(self.budget if budget is None else budget, prompt_length,
                              self.min_entries(prompt_length, spans))
            return kept + max(0, tokens_seen - prompt_length)
        return super().capacity(tokens_seen, prompt_length, spans, budget)

    # While decoding (hold_budget): TOVA's rule, the entry the newest token attends to least goes.
    accumulate = TOVAPolicy.accumulate
    decode_victim = TOVAPolicy.decode_victim
