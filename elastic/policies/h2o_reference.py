"""H2O as the Elastic Cache reference code runs it: the paper's baseline, defects included."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import scoring
from .base import Decode, Policy
from .plans import lowest_score_slot


@dataclass
class ReferenceH2OPolicy(Policy):
    """H2O exactly as the Elastic Cache reference code (``kv_cache.py``, ``H2OCache``) runs it.

    This is the baseline of the paper's tables, and it is not textbook H2O (``"h2o"``):

    * one score shared by all layers (attention received, averaged over heads and layers),
      accumulated over the prefill and every decode step; every layer keeps the same slots;
    * no recent window: only the newest entry is safe while decoding;
    * the prefill keeps ``torch.where(argsort(score) > forget)``, *rank positions* whose
      token index exceeds ``forget = T - ceil(budget * T)``, as if they were token indices
      (SPEC 2), plus the last prompt token: a near-random set, one entry under the budget;
    * its score array is never re-indexed after that selection, so the entry in slot ``i``
      starts decoding with the score of prompt position ``i``;
    * while decoding it evicts the lowest score among slots ``start_size .. S - 2``.

    Only the selection bugs are reproduced: positions stay true unless the run asks for the
    reference protocol (``positions="compressed"`` in :func:`elastic.generate`).

    Parameters
    ----------
    budget : float, default 0.5
    start_size : int, default 1
        Leading slots never evicted while decoding (the reference's ``start_size``).
    """

    budget: float = 0.5

    name: ClassVar[str] = "h2o-ref"
    summary: ClassVar[str] = "H2O as the paper's reference code runs it (shared score, rank-position bug)"
    shared_across_layers = True
    scores_decode = True
    scores_prefill = True

    def protected(self, prompt_length, spans=None):
        return [prompt_length - 1] if prompt_length else []

    def score(self, query, key, scaling):
        return scoring.attention_received(query, key, scaling)

    def plan_prefill(self, scores, prompt):
        T, n_keep = prompt.length, self.prompt_keep(prompt)
        positions = prompt.positions()
        forget = T - n_keep
        if forget <= 0:
            return positions.clone()
        if forget == 1:  # the reference's one-entry path: the lowest score after the sinks
            first = min(self.start_size, T - 2)
            head = scores[:, first:T - 1].float()
            victim = first + head.argmin(dim=-1, keepdim=True)
            return positions.masked_fill(positions == victim, -1)
        order = scores[:, :T - 1].float().argsort(dim=-1, stable=True)  # token index of each rank
        keep = torch.zeros_like(positions, dtype=torch.bool)
        keep[:, :T - 1] = order > forget  # rank r is kept (as position r) if its token index > forget
        keep[:, T - 1] = True
        return torch.where(keep, positions, torch.full_like(positions, -1))

    def initial_accumulated(self, scores, kept):
        return scores[:, :kept.shape[1]]  # slot i keeps the score of position i

    def decode_victim(self, view: Decode):
        rank = view.positions.argsort(dim=-1).argsort(dim=-1)  # slot order as the reference sees it
        S = view.get_seq_length()
        # The reference's sinks are slots; if they cover every slot but the newest, the one
        # before the newest goes (the reference would fail on an empty range).
        first = min(self.start_size, S - 2)
        return lowest_score_slot(view, view.accumulated, (rank >= first) & (rank < S - 1))
