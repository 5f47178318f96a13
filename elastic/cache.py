"""Compressed KV caches as transformers 5 caches: a list of per-layer objects.

Each layer remembers the original position of every slot. ``update`` stores the new
entries; the compression happens right after the layer's attention
(:meth:`PolicyLayer.after_attention`, called by the hook of :func:`elastic.attach`),
because the prefill must first attend over the whole prompt and H2O must see the
attention each new token pays. Entries are physically removed, so every layer has the
same, smaller length and transformers' masks stay right -- unless the policy gives each
layer its own budget (PrefixKV, VL-Cache): then layers differ in length, and a decode
step attends without a mask (compressed caches never hold padding, so a single query
sees every entry it holds; see :func:`elastic.scoring.attach`).

A cache holds one layer object per entry of the text decoder's layer types (bound before
the first forward by the hook of :func:`elastic.attach`, or by ``make_cache(config=...)``):
the policy compresses the ``"full_attention"`` layers; the others are transformers' own
layers and behave exactly as in transformers' ``DynamicCache``. Sliding-window and chunked
layers (``DynamicSlidingWindowLayer``) are not compressed further: their window already
bounds them at ``W`` entries whatever the prompt length, and transformers builds their
mask from the last ``W`` positions in order (``get_mask_sizes``), which an evicted or
merged entry would break. Linear-attention and conv layers (``LinearAttentionLayer``)
hold a fixed-size state, not one entry per token: there is nothing to evict. The budget,
the trace and :meth:`PolicyCache.kv_bytes` count the full-attention layers only;
:meth:`PolicyCache.state_bytes` reports the bounded state of the others.

Two storage layouts make the same decisions:

* ``"preallocated"`` (default, :class:`PreallocatedLayer`): after the prefill the K/V live
  in buffers sized from the budget rule; a decode step writes the new entry in place and
  an eviction moves it into the evicted slot, so no step copies the cache. Slots are then
  no longer in position order (attention does not care: keys carry their RoPE), and
  policies choose victims by original position, never by slot index.
* ``"dynamic"`` (:class:`PolicyLayer`): ``torch.cat`` on every append and a two-slice copy
  on every eviction, slots always in position order. Kept as the reference layout.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, CacheLayerMixin, DynamicLayer
from transformers.cache_utils import LinearAttentionCacheLayerMixin, get_layer_types_and_kwargs

from . import scoring
from .budget import keep_count
from .policies import Decode, Policy, Prefill, make_policy
from .trace import LayerTrace, Trace

LAYOUTS = ("preallocated", "dynamic")
POSITIONS = ("true", "compressed")  # where a decoded token sits (see PolicyCache.decode_position)
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
    """One decoder layer's K/V, compressed by the cache's policy (the ``"dynamic"`` layout).

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


def _has_padding(mask) -> bool:
    """True if some sample does not attend to every position: a 2-D ``[B, T]`` padding
    mask with a 0, or (when only the 4-D mask of a full-attention layer is known) a last
    prompt row that does not see every key (left padding)."""
    if not isinstance(mask, torch.Tensor):
        return False
    last = mask if mask.dim() == 2 else mask[..., -1, :]
    if mask.dim() == 2 or mask.dtype == torch.bool:
        return not bool(last.bool().all())
    return not bool((last == 0).all())


_PADDED = (
    "a padded batch cannot be compressed: evicted slots would no longer line up "
    "with the padding mask; pass equal-length prompts or one prompt at a time"
)


class CrossLayerStep:
    """The part of a step that needs every compressing layer, run by the cache.

    A policy whose score is shared by all layers (``shared_across_layers``) gets one
    score, the mean of theirs (every layer then makes the same decision); a policy with
    one budget per layer (``budgets_per_layer``) first sets every layer's budget from all
    layers' statistics. Layers that report a step as waiting are collected here, and the
    step is finished once the last full-attention layer (``last_layer``) has attended --
    or, if that layer never reports (a model called layer by layer), when a waiting layer
    is updated again or a trace is asked for.
    """

    def __init__(self, policy: Policy, last_layer: int | None = None):
        self.policy = policy
        self.last_layer = last_layer
        self.waiting: list[PolicyLayer] = []

    def add(self, layer: PolicyLayer) -> None:
        self.waiting.append(layer)
        if layer.layer_idx == self.last_layer:
            self.finish()

    def finish(self) -> None:
        layers, self.waiting = self.waiting, []
        if not layers:
            return
        policy = self.policy
        prefill = layers[0].prompt_entries is None
        if prefill and policy.budgets_per_layer:
            first = layers[0]
            budgets = policy.layer_budgets([layer.budget_stat for layer in layers], first.prompt_length, first.spans)
            for layer, budget in zip(layers, budgets):
                layer.budget = budget
        scores = [layer.prefill_scores if prefill else layer.pending_received for layer in layers]
        shared = None
        if scores[0] is not None and policy.shared_across_layers:
            shared = torch.stack(scores).mean(dim=0)
        for layer, own in zip(layers, scores):
            if prefill:
                layer._compress(own if shared is None else shared)
            else:
                layer.pending_received = None
                layer._evict(own if shared is None else shared)


_UNBOUND = (
    "this model mixes layer types, and the cache was not built for them: pass the cache to the "
    "model that elastic.attach(model) hooked (model.generate(..., cache=cache) or model(..., cache=cache)), "
    "or build it with elastic.make_cache(..., config=model.config)"
)


_NOTHING_TO_COMPRESS = (
    "this text decoder has no full-attention layer (its layers are {types}; a model-wide "
    "sliding_window makes every layer a sliding one): transformers already bounds each by its window "
    "or a fixed state, and elastic compresses full-attention layers only, so {method!r} has nothing to "
    "compress. Use method='full', or load the model with sliding_window=None to compress the whole context"
)


class PolicyCache(Cache):
    """A transformers cache whose full-attention layers follow one :class:`~elastic.policies.Policy`.

    One layer object per decoder layer: a :class:`PolicyLayer` (or
    :class:`PreallocatedLayer`) for every ``"full_attention"`` layer, transformers' own
    layer for the other types (see the module docstring). The layers are built from the
    text config's layer types by :meth:`bind` -- called by ``make_cache(config=...)`` or,
    before the first forward, by the hook of :func:`elastic.attach`; a cache that was never
    bound creates full-attention layers lazily, one per decoder layer (all-full models).
    After generating, :attr:`trace` tells what the cache did, :meth:`kv_bytes` what the
    compressed layers hold and :meth:`state_bytes` what the others hold.
    """

    def __init__(self, policy: Policy, layout: str = "preallocated", reserve: int = DEFAULT_RESERVE,
                 positions: str = "true", config=None):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
        if positions not in POSITIONS:
            raise ValueError(f"unknown positions {positions!r}; choose one of {', '.join(POSITIONS)}")
        if int(reserve) != reserve or reserve < 0:
            raise ValueError(f"reserve must be an integer >= 0, got {reserve!r}")
        super().__init__(layer_class_to_replicate=self._new_layer)
        self.policy = policy
        self.layout, self.reserve, self.positions = layout, int(reserve), positions
        self.annotations: dict = {}
        self.layer_types: list[str] | None = None  # the decoder's, once bound
        self._bound_config = None
        self.padded: bool | None = None  # the prompt's 2-D mask had padding (None: not seen)
        self.step = CrossLayerStep(policy)
        if config is not None:
            self.bind(config)

    # -- building the layers ---------------------------------------------------------
    def bind(self, config) -> "PolicyCache":
        """Build one layer per entry of the text decoder's layer types (``config``: the
        model's config or its text config). Idempotent; raises ``ValueError`` for a type
        elastic does not handle or a cache already filled for another model."""
        if config is self._bound_config:  # the hook calls this before every forward: stay cheap
            return self
        config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        types = scoring.check_layer_types(config)
        if self.layer_types is not None:
            if types != self.layer_types:
                raise ValueError("this cache was built for another model's layers: make a new cache with "
                                 "elastic.make_cache() for each model")
            self._bound_config = config
            return self
        if self.layers:
            if any(kind != "full_attention" for kind in types):
                raise ValueError(_UNBOUND)
            self.layer_types, self.layer_class_to_replicate = types, None
            self.step.last_layer = len(types) - 1
            self._bound_config = config
            return self
        full = [i for i, kind in enumerate(types) if kind == "full_attention"]
        if not full and self.policy.name != "full":
            raise ValueError(_NOTHING_TO_COMPRESS.format(types=", ".join(sorted(set(types))), method=self.policy.name))
        _, kwargs = get_layer_types_and_kwargs(config)
        self.layers = [self._new_layer(i) if kind == "full_attention" else DYNAMIC_LAYER_TYPE_MAPPING[kind](**kw)
                       for i, (kind, kw) in enumerate(zip(types, kwargs))]
        self.layer_types, self.layer_class_to_replicate = types, None
        self.step.last_layer = full[-1] if full else None
        self._bound_config = config
        return self

    def prepare(self, config, attention_mask=None) -> None:
        """What the attach hook calls before each forward: :meth:`bind`, and before the
        prompt, note whether its 2-D ``attention_mask`` has padding."""
        self.bind(config)
        if self.get_seq_length() == 0 and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            self.padded = _has_padding(attention_mask)

    def _new_layer(self, layer_idx: int | None = None) -> PolicyLayer:
        layer_idx = len(self.layers) if layer_idx is None else layer_idx
        if self.layout == "dynamic":
            return PolicyLayer(self.policy, layer_idx)
        return PreallocatedLayer(self.policy, layer_idx, self.reserve)

    @property
    def policy_layers(self) -> list[PolicyLayer]:
        """The compressed (full-attention) layers, in decoder order."""
        return [layer for layer in self.layers if isinstance(layer, PolicyLayer)]

    @property
    def spans(self) -> dict | None:
        """Token-type spans of the prompt, if annotated (policies that protect the instruction need them)."""
        return self.annotations.get("spans")

    # -- the step --------------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self.step.waiting and layer_idx < len(self.layers) and self.layers[layer_idx] in self.step.waiting:
            self.step.finish()  # its last step waits for a last layer the hook never named
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if isinstance(self.layers[layer_idx], PolicyLayer):
            scoring.expect_attention(layer_idx, self._after_attention)
        return keys, values

    def _after_attention(self, layer_idx: int, attention) -> None:
        """Called by the attach hook right after layer ``layer_idx`` attended."""
        layer = self.layers[layer_idx]
        if self.layer_types is None:  # never bound: learn where the step ends from the module's config
            config = attention.config
            if config is not None and any(kind != "full_attention" for kind in scoring.layer_types(config)):
                raise ValueError(_UNBOUND)
            self.step.last_layer = getattr(config, "num_hidden_layers", 0) - 1 if config is not None else None
        if layer.prompt_length is None and self.policy.name != "full":
            padded = _has_padding(attention.mask) if self.padded is None else self.padded
            if padded:
                layer.awaiting_attention = False
                raise ValueError(_PADDED)
        if layer.after_attention(attention.query, attention.key, attention.mask, attention.scaling, self.spans):
            self.step.add(layer)

    def finish_step(self) -> None:
        """Finish a cross-layer step still waiting (see :class:`CrossLayerStep`)."""
        self.step.finish()

    # -- what the cache holds -----------------------------------------------------------
    @property
    def lengths(self) -> list:
        """Entries per full-attention layer after each forward, the mean over those layers
        (an int when every layer holds the same number, as with one budget for all layers)."""
        return [int(n) if float(n).is_integer() else float(n) for n in self.layer_lengths.mean(axis=1)]

    @property
    def layer_lengths(self) -> np.ndarray:
        """``[forwards, full-attention layers]`` entries each compressed layer held after each forward."""
        layers = [layer for layer in self.policy_layers if layer.history]
        if not layers:
            return np.zeros((0, 0), dtype=np.int64)
        n = min(len(layer.history) for layer in layers)
        return np.array([layer.history[:n] for layer in layers], dtype=np.int64).T.reshape(n, len(layers))

    def _first_full(self):
        """The first compressed layer (sequence length and mask sizes come from it), else
        transformers' first attention layer, else None."""
        for layer in self.layers:
            if isinstance(layer, PolicyLayer):
                return layer
        return next((layer for layer in self.layers if isinstance(layer, CacheLayerMixin)), None)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far (not entries held): models derive default position ids from
        it, and positions must stay the true ones after compression. The default reads the
        first full-attention layer (as transformers' hybrid caches do)."""
        if layer_idx >= len(self.layers):
            return 0
        layer = self.layers[layer_idx]
        if layer_idx == 0 and not isinstance(layer, PolicyLayer):
            layer = self._first_full()
        if isinstance(layer, PolicyLayer):
            return layer.seen
        if layer is None or not isinstance(layer, CacheLayerMixin):
            return super().get_seq_length(layer_idx)  # transformers' own error for a state-only layer
        return layer.get_seq_length()

    def decode_position(self, true_position: int) -> int:
        """Position id of the next decoded token: its true position, or with
        ``positions="compressed"`` the number of entries held (the reference code's protocol:
        positions restart near ``budget * T`` and repeat after evictions, SPEC 2)."""
        first = self._first_full()
        if self.positions == "true" or not isinstance(first, PolicyLayer):
            return true_position
        return first.get_seq_length()

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """Masks of a compressed layer index the entries actually held, so their offset is
        the physical length; other layers keep transformers' offset."""
        if layer_idx >= len(self.layers):
            return 0
        layer = self.layers[layer_idx]
        if isinstance(layer, PolicyLayer):
            return layer.get_seq_length()
        return self.get_seq_length(layer_idx)

    def get_conv_state(self, layer_idx: int, state_idx: int = 0):
        self._check_bound(layer_idx)
        return super().get_conv_state(layer_idx, state_idx)

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0):
        self._check_bound(layer_idx)
        return super().get_recurrent_state(layer_idx, state_idx)

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        self._check_bound(layer_idx)
        return super().has_previous_state(layer_idx, state_idx)

    def _check_bound(self, layer_idx) -> None:
        """A linear-attention or conv layer asks for its state: it exists only once bound."""
        if self.layer_types is None:
            raise ValueError(_UNBOUND)

    def kv_bytes(self) -> int:
        """Bytes of the K/V entries held now by the compressed (full-attention) layers: the
        memory the budget governs. The other layers' state is :meth:`state_bytes`."""
        return sum(_nbytes(layer.keys) + _nbytes(layer.values) for layer in self.policy_layers if layer.is_initialized)

    def state_bytes(self) -> int:
        """Bytes held now by the layers the policy does not compress: the K/V of sliding
        and chunked windows (at most ``W`` entries each) and the conv / recurrent state of
        linear-attention and conv layers (a fixed size). 0 for an all-full-attention model."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, PolicyLayer):
                continue
            if isinstance(layer, LinearAttentionCacheLayerMixin):
                states = list(layer.conv_states.values()) + list(layer.recurrent_states.values())
                total += sum(_nbytes(x) for x in states if isinstance(x, torch.Tensor))
            elif isinstance(getattr(layer, "keys", None), torch.Tensor):
                total += _nbytes(layer.keys) + _nbytes(layer.values)
        return total

    def allocated_bytes(self) -> int:
        """Bytes of K/V memory allocated by the compressed (full-attention) layers: the held
        entries plus the free slots of preallocated buffers."""
        return sum(
            _nbytes(layer.buffers["keys"]) + _nbytes(layer.buffers["values"])
            if getattr(layer, "buffers", None) else _nbytes(layer.keys) + _nbytes(layer.values)
            for layer in self.policy_layers
            if layer.is_initialized
        )

    def annotate(self, **fields) -> None:
        """Attach prompt metadata (``spans``, ``image_grid``, ``image_tiles``, ``tokens``) to the traces."""
        unknown = set(fields) - {"spans", "image_grid", "image_tiles", "tokens"}
        if unknown:
            raise ValueError(f"unknown trace annotation(s): {sorted(unknown)}")
        self.annotations.update(fields)

    @property
    def trace(self) -> Trace:
        """The trace of the first (usually only) sequence in the batch."""
        return self.traces[0]

    @property
    def traces(self) -> list[Trace]:
        """One :class:`~elastic.trace.Trace` per sequence in the batch.

        For a policy that selects per KV head, each is KV head 0's trace, and its ``heads``
        holds one trace per KV head.
        """
        self.step.finish()  # a shared-score step not finished yet (the last layer never reported)
        layers = [layer for layer in self.policy_layers if layer.prompt_length is not None]
        if not layers:
            raise RuntimeError("the cache has not seen a prompt yet: run generate() with it first")
        first, policy = layers[0], self.policy
        T, batch, G = first.prompt_length, first.keys.shape[0], first.groups
        # K and V of one entry in every layer (layers may differ in length, not in width).
        per_entry = sum(_nbytes(layer.keys[:1, :, :1]) + _nbytes(layer.values[:1, :, :1]) for layer in layers)
        layer_lengths = self.layer_lengths

        def numpy(t):
            return None if t is None else t.detach().float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy()

        scores = [numpy(layer.prefill_scores) for layer in layers]
        groups = [numpy(layer.prefill_group) for layer in layers]
        rows = [  # the layer column indexes trace.layers (the decoder index is trace.layer_ids)
            (step, index, positions)
            for index, layer in enumerate(layers)
            for step, positions in ((s, numpy(p)) for s, p in layer.evicted)
        ]
        decode_rule = getattr(policy, "decode", "fixed-point")

        def fixed_point(layer) -> int | None:  # N_tl: each layer's own when the layers' lengths differ
            if not hasattr(policy, "fixed_point") or decode_rule != "fixed-point":
                return None
            return policy.fixed_point(layer.prompt_entries, layer.prompt_length)

        def trace_of(row: int, head: int | None) -> Trace:
            evictions = np.array([(s, l, p[row]) for s, l, p in rows], dtype=np.int64).reshape(-1, 3)
            layer_traces = [
                LayerTrace(
                    scores=None if s is None else s[row],
                    kept=np.flatnonzero(g[row] == np.arange(T)),
                    group=g[row].astype(np.int64),
                    budget=policy.budget if layer.budget is None else layer.budget,
                    budget_entries=keep_count(policy.budget if layer.budget is None else layer.budget, T, 0),
                    fixed_point=fixed_point(layer),
                )
                for s, g, layer in zip(scores, groups, layers)
            ]
            return Trace(
                method=policy.name,
                budget=policy.budget,
                start_size=policy.start_size,
                distance=getattr(policy, "distance", None),
                prompt_length=T,
                protected=np.array(policy.protected(T, self.spans), dtype=np.int64),
                layers=layer_traces,
                layer_ids=[layer.layer_idx for layer in layers],
                evictions=evictions[np.lexsort((evictions[:, 2], evictions[:, 1], evictions[:, 0]))],
                lengths=self.lengths,
                layer_lengths=layer_lengths,
                tokens_seen=first.seen,
                fixed_point=fixed_point(first),
                bytes_per_entry=int(per_entry),
                budget_entries=keep_count(policy.budget, T, 0),
                options=policy.options(),
                variant=policy.variant(),
                head=head,
                **self.annotations,
            )

        traces = []
        for b in range(batch):
            if G == 1:
                traces.append(trace_of(b, None))
            else:
                heads = [trace_of(b * G + h, h) for h in range(G)]
                heads[0].heads = heads
                traces.append(heads[0])
        return traces


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


def make_cache(method: str = "elastic", layout: str = "preallocated", reserve: int = DEFAULT_RESERVE,
               positions: str = "true", config=None, **params) -> PolicyCache:
    """A fresh cache for one ``generate`` call.

    Parameters
    ----------
    method : {"full", "elastic", "h2o", "local", "snapkv", "tova", "h2o-ref"}
    layout : {"preallocated", "dynamic"}
        How entries are stored (see the module docstring); both make the same decisions
        and generate the same tokens.
    reserve : int, default 256
        ``"preallocated"`` only: decode tokens the buffers have room for right after the
        prefill (then they grow geometrically). Pass ``max_new_tokens`` to never regrow.
    positions : {"true", "compressed"}
        Position ids of decoded tokens under :func:`elastic.generate` and the evaluation:
        their true positions, or (the reference code's protocol, to reproduce the paper's
        runs) the cache's length. Plain ``model.generate`` always uses true positions.
    config : optional
        The model's config (or its text config): build the layers for its decoder's layer
        types now. Without it, the hook of :func:`elastic.attach` does it before the first
        forward.
    **params
        The policy's parameters: ``budget`` (fraction of KV entries kept, in (0, 1]),
        ``start_size`` (sink tokens), ``distance`` (Elastic's N_tl offset),
        ``recent_ratio`` (H2O), Elastic's ablation options (``importance``, ``scope``,
        ``prefill``, ``decode``, ``protect``, ...), SnapKV's ``window`` / ``kernel`` /
        ``pooling``, ``heads`` (SnapKV, TOVA). A parameter another method uses is ignored.
    """
    return PolicyCache(make_policy(method, **params), layout=layout, reserve=reserve, positions=positions,
                       config=config)
