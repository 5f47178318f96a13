"""SnapKV (Li et al., NeurIPS 2024): the prompt's last queries pick what to keep."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import scoring
from .base import HEADS, Policy, choice, whole
from .plans import recent_and_top
from .tova import TOVAPolicy


@dataclass
class SnapKVPolicy(Policy):
    """SnapKV (Li et al., NeurIPS 2024): an observation window votes for the prompt's entries.

    Prefill: the last ``window`` prompt queries (the observation window) score every
    earlier key by the attention they pay it (summed over the window, per KV head,
    averaged over the query heads that share it), smoothed by 1-D pooling over positions
    (``kernel``). The window itself is kept; the rest of the budget goes to the top-scoring
    earlier entries, per KV head. The paper compresses only the prompt; to hold the same
    budget while decoding, each step drops the entry the newest token attends to least
    (TOVA's rule, as kvpress combines them).

    Parameters
    ----------
    budget : float, default 0.5
    window : int, default 32
        Observation window (SnapKV's code: 32; never more than the entries kept).
    kernel : int, default 5
        Pooling kernel (SnapKV's code: 5, average pooling).
    pooling : {"avg", "max"}, default "avg"
    heads : {"each", "mean"}, default "each"
        Each KV head keeps its own entries (SnapKV), or one selection per layer from the
        heads' mean.
    """

    budget: float = 0.5
    window: int = 32
    kernel: int = 5
    pooling: str = "avg"
    heads: str = "each"

    name: ClassVar[str] = "snapkv"
    summary: ClassVar[str] = "the prompt's last queries vote for the entries to keep, per head"
    scores_decode = True
    scores_prefill = True

    def __post_init__(self):
        super().__post_init__()
        self.window = whole("window", self.window, 1)
        self.kernel = whole("kernel", self.kernel, 1)
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd (pooling keeps every position), got {self.kernel}")
        choice("pooling", self.pooling, ("avg", "max"))
        choice("heads", self.heads, HEADS)

    @property
    def per_head(self):
        return self.heads == "each"

    def score(self, query, key, scaling):
        window = min(self.window, query.shape[-2])
        votes = scoring.attention_received(query[:, :, -window:], key, scaling, per_head=self.per_head)
        return pool(votes, self.kernel, self.pooling, key.shape[-2] - window)

    def plan_prefill(self, scores, prompt):
        n_keep = self.prompt_keep(prompt)
        return recent_and_top(scores, prompt, n_keep, min(self.window, n_keep))

    # While decoding: TOVA's rule (the entry the newest token attends to least goes).
    accumulate = TOVAPolicy.accumulate
    decode_victim = TOVAPolicy.decode_victim


def pool(scores: torch.Tensor, kernel: int, kind: str, length: int) -> torch.Tensor:
    """Smooth ``scores[..., :length]`` over positions (stride 1, zero padding counted, as
    SnapKV's ``avg_pool1d``); the rest (the window) is left as it is."""
    if kernel == 1 or length == 0:
        return scores
    head = scores[..., :length]
    flat = head.reshape(-1, 1, length)
    fn = torch.nn.functional.avg_pool1d if kind == "avg" else torch.nn.functional.max_pool1d
    smooth = fn(flat, kernel, stride=1, padding=kernel // 2).reshape(head.shape)
    return torch.cat([smooth, scores[..., length:]], dim=-1)
