"""Selection rules several policies share, as plain functions.

Prefill plans take scores and a :class:`~.base.Prefill` and return ``group`` ``[rows, T]``
(see :meth:`~.base.Policy.plan_prefill`); decode rules take a :class:`~.base.Decode` view
and return the slot ``[rows]`` to evict. Entry counts come from :mod:`elastic.budget`;
nothing here touches a cache.
"""

from __future__ import annotations

import torch

from .base import Decode, Prefill

# ---------------------------------------------------------------- prefill plans


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


def recent_and_top(scores: torch.Tensor, prompt: Prefill, keep: int, recent: int) -> torch.Tensor:
    """Keep the last ``recent`` prompt positions and the ``keep - recent`` best-scoring
    earlier ones; evict the rest (H2O's heavy hitters plus a recent window; SnapKV's
    observation window; VL-Cache's recent share). ``keep >= T`` keeps everything."""
    if keep >= prompt.length:
        return prompt.positions().clone()
    older = prompt.positions() < prompt.length - recent
    return keep_mask(top_k_mask(scores, keep - recent, older) | ~older, prompt)


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


# ---------------------------------------------------------------- decode victims


def fixed_point_index(prompt_entries: int, sinks: int, distance: int) -> int:
    """Elastic Cache's N_tl: ``prompt_entries + distance`` (the end of the compressed prompt,
    offset by ``distance``, -25 in the paper), never one of the ``sinks``."""
    return max(sinks, prompt_entries + distance)


def fixed_point_slot(view: Decode, n_tl: int) -> torch.Tensor:
    """Slot of the entry at index ``n_tl`` in position order (the newest, if fewer are held):
    the compressed prompt head before it stays, a window of recent entries slides behind."""
    return view.slot_of_rank(min(n_tl, view.get_seq_length() - 1))


def lowest_score_slot(view: Decode, score: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Slot ``[rows]`` with the lowest ``score`` among ``candidates``; a tie goes to the
    oldest entry, whatever the slot order."""
    score = score.masked_fill(~candidates, float("inf"))
    positions = view.positions
    tied = score == score.min(dim=-1, keepdim=True).values
    return torch.where(tied, positions, torch.iinfo(positions.dtype).max).argmin(dim=-1)
