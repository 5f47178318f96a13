"""The compressing cache layers: one decoder layer's K/V, compressed by a policy.

:class:`PolicyLayer` (the ``"dynamic"`` layout) and :class:`PreallocatedLayer` (the
``"preallocated"`` one, the default) make the same decisions; see :mod:`elastic.cache`
for the cache that holds them, one per full-attention layer. A layer knows its policy
and nothing of its cache (transformers' style): the cache calls
:meth:`PolicyLayer.after_attention` once the layer has attended, and finishes a step
that needs every layer (a shared score, per-layer budgets) itself.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from .policies import Decode, Policy, Prefill

DEFAULT_RESERVE = 256  # decode tokens a preallocated layer has room for before it grows

_NOT_ATTACHED = (
    "this cache compresses right after each layer's attention, but the model's attention "
    "never reached it: call elastic.attach(model) once before generating"
)

_NO_CONTINUATION = (
    "this cache already holds a compressed prompt and cannot take {n} new tokens at once "
    "(only the prompt is compressed by merging; a new turn needs a fresh prefill): "
    "make a new cache with elastic.make_cache() for the whole conversation"
)


class PolicyLayer(DynamicLayer):
    """One decoder layer's K/V, compressed by ``policy`` (the ``"dynamic"`` layout).

    ``keys`` / ``values`` ``[B, H_kv, S, D]`` hold the ``S`` entries kept, ``positions``
    ``[rows, S]`` their original positions; slot order is position order in this layout.
    A policy that selects per KV head makes ``rows = B * H_kv``: every (sample, KV head)
    keeps its own positions (``_rows`` views the K/V that way); otherwise ``rows = B``.
    """

    def __init__(self, policy: Policy, layer_idx: int):
        super().__init__()
        self.policy = policy
        self.layer_idx = layer_idx  # the decoder layer it caches
        self.spans: dict | None = None  # the prompt's token-type spans, set at the prefill
        self.positions: torch.Tensor | None = None  # [rows, S] original position of each slot
        self.accumulated: torch.Tensor | None = None  # [rows, S] per-entry decode score (H2O, TOVA)
        self.groups = 1  # rows per sample: KV heads for a per-head policy
        self.seen = 0  # tokens fed through this layer
        self.prompt_length: int | None = None
        self.prompt_entries: int | None = None  # entries kept after the prefill
        self.budget: float | None = None  # this layer's own budget (per-layer policies), else the policy's
        self.budget_stat = None  # what the policy needs from this layer to set the layers' budgets
        self.history: list[int] = []  # entries held after each forward
        self.awaiting_attention = False
        self.pending_received: torch.Tensor | None = None  # a shared-score decode step's attention
        # Record, kept as tensors until a trace is asked for (no GPU sync per step).
        self.prefill_scores: torch.Tensor | None = None
        self.prefill_group: torch.Tensor | None = None
        self.evicted: list[tuple[int, torch.Tensor]] = []  # (decode step, original positions [rows])

    def capacity(self) -> int:
        return self.policy.capacity(self.seen, self.prompt_length, self.spans, self.budget)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, S, D]`` as ``[B * G, H / G, S, D]``, one row per selection (a view)."""
        return x.unflatten(1, (self.groups, x.shape[1] // self.groups)).flatten(0, 1)

    def _unrows(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(0, (x.shape[0] // self.groups, self.groups)).flatten(1, 2)

    def update(self, key_states, value_states, *args, **kwargs):
        if self.awaiting_attention:
            raise RuntimeError(_NOT_ATTACHED)
        n_new = key_states.shape[-2]
        if self.prompt_length is not None and n_new != 1:
            raise ValueError(_NO_CONTINUATION.format(n=n_new))
        keys, values = self._append(key_states, value_states)
        self.seen += n_new
        self.awaiting_attention = True
        return keys, values

    def _append(self, key_states, value_states):
        """Store new entries (original positions from ``seen`` on); return the K/V to attend over."""
        n_new = key_states.shape[-2]
        keys, values = DynamicLayer.update(self, key_states, value_states)
        rows = keys.shape[0] if self.positions is None else self.positions.shape[0]
        new = torch.arange(self.seen, self.seen + n_new, device=keys.device).expand(rows, -1)
        self.positions = new if self.positions is None else torch.cat([self.positions, new], dim=1)
        return keys, values

    def slot_of_rank(self, rank: int) -> torch.Tensor:
        """Slot ``[rows]`` of each row's entry with the ``rank``-th smallest original position."""
        return torch.full((self.positions.shape[0],), rank, dtype=torch.long, device=self.keys.device)

    def decode_view(self, capacity: int) -> Decode:
        """What the policy sees of this layer when it picks a decode victim (never the layer)."""
        return Decode(layer_idx=self.layer_idx, positions=self.positions, accumulated=self.accumulated,
                      seen=self.seen, prompt_length=self.prompt_length, prompt_entries=self.prompt_entries,
                      max_entries=capacity, budget=self.budget,
                      ordered=not isinstance(self, PreallocatedLayer))  # a preallocated layer permutes slots

    def after_attention(self, query, key, attention_mask, scaling, spans: dict | None = None) -> bool:
        """Score and compress now that the layer has attended (the cache calls it from the
        attach hook). Return True if the step waits for the other layers (a score shared by
        all layers, or one budget per layer): the cache's :class:`CrossLayerStep` then
        finishes it through :meth:`_compress` / :meth:`_evict`."""
        self.awaiting_attention = False
        if self.prompt_length is None:
            self.spans = spans
            return self._prefill(query, key, attention_mask, scaling)
        return self._decode(query, key, scaling)

    def _prefill(self, query, key, attention_mask, scaling) -> bool:
        policy = self.policy
        self.prompt_length = self.seen
        self.groups = self.keys.shape[1] if policy.per_head else 1
        scores, self.budget_stat = (policy.prefill_scores(query, key, scaling, self.spans)
                                    if policy.scores_prefill else (None, None))
        if scores is not None and policy.per_head:
            scores = scores.flatten(0, 1)  # [B, H_kv, T] -> one row per (sample, KV head)
        self.prefill_scores = scores
        if policy.shared_across_layers or policy.budgets_per_layer:  # planned once every layer has attended
            return True
        self._compress(scores)
        return False

    def _compress(self, scores: torch.Tensor | None):
        """Apply the policy's prefill plan for ``scores`` ``[rows, T]``."""
        policy, B = self.policy, self.keys.shape[0]
        prompt = Prefill(length=self.prompt_length, rows=B * self.groups, device=self.keys.device,
                         spans=self.spans, keys=self._rows(self.keys), budget=self.budget)
        group = policy.plan_prefill(scores, prompt)
        kept = self._fold(group)
        if policy.scores_decode:
            self.accumulated = policy.initial_accumulated(scores, kept)
        self.prompt_entries = self.get_seq_length()
        self.prefill_scores, self.prefill_group, self.budget_stat = scores, group, None
        self.history.append(self.prompt_entries)

    def _decode(self, query, key, scaling) -> bool:
        policy = self.policy
        received = policy.decode_score(query, key, scaling) if policy.scores_decode else None
        if received is not None and policy.shared_across_layers:  # one score: all layers must attend first
            self.pending_received = received
            return True
        self._evict(received)
        return False

    def _evict(self, received: torch.Tensor | None):
        """Fold this step's attention into the entries' scores, then evict down to the budget."""
        if received is not None:
            self._accumulate(received)
        capacity = self.capacity()
        while self.get_seq_length() > capacity:
            self._drop(self.policy.decode_victim(self.decode_view(capacity)))
        self.history.append(self.get_seq_length())

    def _accumulate(self, received: torch.Tensor):
        """Fold this step's attention ``[rows, S]`` (slot order) into the per-entry score;
        the new entry starts at 0."""
        self.accumulated = self.policy.accumulate(torch.nn.functional.pad(self.accumulated, (0, 1)), received)

    def _fold(self, group: torch.Tensor) -> torch.Tensor:
        """Replace the prompt's slots by one slot per kept position (mean of what it holds)."""
        R, T = group.shape
        positions = torch.arange(T, device=self.keys.device)
        is_kept = group == positions
        n_kept = int(is_kept[0].sum())
        if not bool((is_kept.sum(dim=1) == n_kept).all()):
            raise RuntimeError(f"{self.policy.name} kept a different number of entries in different rows")
        kept = positions.expand(R, T)[is_kept].view(R, n_kept)
        keys, values = self._rows(self.keys), self._rows(self.values)
        _, h, _, D = keys.shape
        if n_kept == T:  # nothing merged or evicted (full cache, budget 1.0): no copy at all
            pass
        elif bool(((group == positions) | (group < 0)).all()):  # nothing merged: a gather
            index = kept[:, None, :, None].expand(R, h, n_kept, D)
            self.keys, self.values = self._unrows(keys.gather(2, index)), self._unrows(values.gather(2, index))
        else:
            slot = torch.searchsorted(kept, group.clamp(min=0).contiguous())
            slot = torch.where(group >= 0, slot, n_kept)  # evicted tokens go to a spare slot
            self.keys, self.values = (self._unrows(_group_mean(x, slot, n_kept)) for x in (keys, values))
        self.positions = kept
        return kept

    def _drop(self, slot: torch.Tensor):
        """Remove slot ``slot[r]`` of every row ``r``."""
        R, S = self.positions.shape
        rest = torch.arange(S - 1, device=slot.device).expand(R, -1)
        rest = rest + (rest >= slot[:, None])
        self.evicted.append((self.seen - self.prompt_length, self.positions.gather(1, slot[:, None])[:, 0]))
        if R == 1 or bool((slot == slot[0]).all()):
            # The common case (a fixed point, a sink window, batch 1): two slices copy half
            # the bytes of a gather, which also reads an int64 index as large as the cache.
            s = int(slot[0])
            self.keys, self.values = (torch.cat([x[:, :, :s], x[:, :, s + 1:]], dim=2)
                                      for x in (self.keys, self.values))
        else:
            keys, values = self._rows(self.keys), self._rows(self.values)
            index = rest[:, None, :, None].expand(R, keys.shape[1], S - 1, keys.shape[3])
            self.keys, self.values = self._unrows(keys.gather(2, index)), self._unrows(values.gather(2, index))
        self.positions = self.positions.gather(1, rest)
        if self.accumulated is not None:
            self.accumulated = self.accumulated.gather(1, rest)

    # Keep the cache usable with generate() features that reshape the batch.
    def batch_repeat_interleave(self, repeats: int) -> None:
        # (num_return_sequences with sampling repeats the prompt before the prefill: that works,
        # as a batch of equal prompts; only a cache already filled cannot be repeated.)
        raise NotImplementedError("elastic caches cannot be repeated once filled (beam search, contrastive search)")

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("elastic caches do not support beam search")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("elastic caches cannot be cropped (assisted decoding is not supported)")


class PreallocatedLayer(PolicyLayer):
    """A :class:`PolicyLayer` whose decode steps never copy the cache (``"preallocated"``).

    The prefill is stored and compressed exactly as in the dynamic layout; the kept
    entries then move into buffers with room for ``capacity(T + reserve) + 1`` entries (the
    budget rule, plus one spare slot for the token that arrives before an eviction).
    ``keys`` / ``values`` / ``positions`` / ``accumulated`` are views of the first ``S``
    slots. A decode step writes its entry at slot ``S``; evicting slot ``v`` moves the last
    entry into ``v``, so the entries stay a prefix of the buffers. (With Elastic's fixed
    point the window behind ``N_tl`` thus becomes a ring: the new token takes the evicted
    slot.) Past ``reserve`` decode tokens the buffers grow geometrically: a copy at
    most every doubling, never per step.
    """

    def __init__(self, policy: Policy, layer_idx: int, reserve: int = DEFAULT_RESERVE):
        super().__init__(policy, layer_idx)
        self.reserve = reserve
        self.buffers: dict[str, torch.Tensor] | None = None  # keys, values, positions, accumulated

    @property
    def slots(self) -> int:
        """Entries the buffers can hold (0 before the prefill)."""
        return 0 if self.buffers is None else self.buffers["keys"].shape[2]

    def _compress(self, scores):
        super()._compress(scores)
        self._allocate()

    def _allocate(self):
        """(Re)allocate the buffers for ``reserve`` more tokens and copy the entries in."""
        slots = self.policy.capacity(self.seen + self.reserve, self.prompt_length, self.spans, self.budget) + 1
        live = {"keys": self.keys, "values": self.values, "positions": self.positions,
                "accumulated": self.accumulated}
        self.buffers = {}
        for name, x in live.items():
            if x is None:
                continue
            axis = 2 if x.dim() == 4 else 1  # the slot axis of [B, H, S, D] and [B, S]
            shape = list(x.shape)
            shape[axis] = slots
            self.buffers[name] = x.new_zeros(shape)
            self.buffers[name].narrow(axis, 0, x.shape[axis]).copy_(x)
        self._set_length(self.keys.shape[-2])

    def _set_length(self, n: int):
        """Point the live views at the first ``n`` slots (views: nothing is copied)."""
        b = self.buffers
        self.keys, self.values, self.positions = b["keys"][:, :, :n], b["values"][:, :, :n], b["positions"][:, :n]
        if "accumulated" in b:
            self.accumulated = b["accumulated"][:, :n]

    def _append(self, key_states, value_states):
        if self.buffers is None:  # the prefill: stored as the dynamic layout stores it
            return super()._append(key_states, value_states)
        n = self.keys.shape[-2]
        if n + 1 > self.slots:
            self.reserve = max(self.reserve, self.seen)  # double the horizon: amortised O(1)
            self._allocate()
        b = self.buffers
        b["keys"][:, :, n:n + 1].copy_(key_states)
        b["values"][:, :, n:n + 1].copy_(value_states)
        b["positions"][:, n] = self.seen
        if "accumulated" in b:
            b["accumulated"][:, n] = 0.0
        self._set_length(n + 1)
        return self.keys, self.values

    def _accumulate(self, received):
        # In place (the new slot was zeroed by _append): the buffer stays the storage.
        self.accumulated.copy_(self.policy.accumulate(self.accumulated, received))

    def slot_of_rank(self, rank):
        return self.positions.kthvalue(rank + 1, dim=1).indices

    def _drop(self, slot):
        """Evict slot ``slot[r]`` of every row ``r``: the last entry moves into it."""
        R, S = self.positions.shape
        self.evicted.append((self.seen - self.prompt_length, self.positions.gather(1, slot[:, None])[:, 0]))
        # Scatter, not slicing: rows may evict different slots, and no sync is needed.
        # The one-entry source is cloned because the victim may be the last slot itself.
        for x in (self._rows(self.keys), self._rows(self.values)):  # views of the buffers
            index = slot.view(R, 1, 1, 1).expand(R, x.shape[1], 1, x.shape[3])
            x.scatter_(2, index, x[:, :, S - 1:S].clone())
        for x in (self.positions, self.accumulated):
            if x is not None:
                x.scatter_(1, slot[:, None], x[:, S - 1:S].clone())
        self._set_length(S - 1)


def _group_mean(x: torch.Tensor, slot: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, H, n, D]`` plain mean of the entries of ``x`` sent to each slot (``n`` is spare)."""
    B, H, T, D = x.shape
    index = slot[:, None, :, None].expand(B, H, T, D)
    sums = torch.zeros(B, H, n + 1, D, dtype=torch.float32, device=x.device).scatter_add_(2, index, x.float())
    counts = torch.zeros(B, n + 1, dtype=torch.float32, device=x.device).scatter_add_(
        1, slot, torch.ones_like(slot, dtype=torch.float32)
    )
    return (sums[:, :, :n] / counts[:, None, :n, None]).to(x.dtype)
