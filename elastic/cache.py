"""Compressed KV caches as transformers 5 caches: a list of per-layer objects.

Each :class:`PolicyLayer` is a ``DynamicLayer`` that remembers the original position of
every slot. ``update`` appends as usual; the compression happens right after the layer's
attention (:meth:`PolicyLayer.after_attention`, called by the hook of
:func:`elastic.attach`), because the prefill must first attend over the whole prompt and
H2O must see the attention each new token pays. Entries are physically removed, so every
layer has the same, smaller length and transformers' masks stay right.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer

from . import scoring
from .methods import Policy, make_policy
from .trace import LayerTrace, Trace

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
    """One decoder layer's K/V, compressed by the cache's policy."""

    def __init__(self, cache: "PolicyCache", layer_idx: int):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.positions: torch.Tensor | None = None  # [B, S] original position of each slot
        self.accumulated: torch.Tensor | None = None  # [B, S] attention received so far (H2O)
        self.seen = 0  # tokens fed through this layer
        self.forwards = 0  # forwards completed: 1 after the prefill
        self.prompt_length: int | None = None
        self.prompt_entries: int | None = None  # entries kept after the prefill
        self.awaiting_attention = False
        # Record, kept as tensors until a trace is asked for (no GPU sync per step).
        self.prefill_scores: torch.Tensor | None = None
        self.prefill_group: torch.Tensor | None = None
        self.evicted: list[tuple[int, torch.Tensor]] = []  # (step, original positions [B])

    @property
    def policy(self) -> Policy:
        return self.cache.policy

    def capacity(self) -> int:
        return self.policy.capacity(self.seen, self.prompt_length)

    def update(self, key_states, value_states, *args, **kwargs):
        if self.awaiting_attention:
            raise RuntimeError(_NOT_ATTACHED)
        n_new = key_states.shape[-2]
        if self.prompt_length is not None and n_new != 1:
            raise ValueError(_NO_CONTINUATION.format(n=n_new))
        keys, values = super().update(key_states, value_states)
        new = torch.arange(self.seen, self.seen + n_new, device=keys.device).expand(keys.shape[0], -1)
        self.positions = new if self.positions is None else torch.cat([self.positions, new], dim=1)
        self.seen += n_new
        self.awaiting_attention = True
        scoring._waiting.layer = self
        return keys, values

    def after_attention(self, query, key, attention_mask, scaling):
        """Compress now that the layer has attended (called by the attach hook)."""
        self.awaiting_attention = False
        if self.prompt_length is None:
            self._prefill(query, key, attention_mask, scaling)
        else:
            self._decode(query, key, scaling)
        self.forwards += 1
        if self.layer_idx == 0:
            self.cache.lengths.append(self.get_seq_length())

    def _prefill(self, query, key, attention_mask, scaling):
        policy, T, B = self.policy, self.seen, self.keys.shape[0]
        if policy.name != "full" and _has_padding(attention_mask):
            raise ValueError(
                "a padded batch cannot be compressed: evicted slots would no longer line up "
                "with the padding mask; pass equal-length prompts or one prompt at a time"
            )
        self.prompt_length = T
        scores = scoring.attention_received(query, key, scaling) if policy.scores_prefill else None
        group = policy.plan_prefill(scores, T, B, self.keys.device)
        kept = self._fold(group)
        if policy.scores_decode:
            self.accumulated = scores.gather(1, kept)
        self.prompt_entries = self.get_seq_length()
        self.prefill_scores, self.prefill_group = scores, group

    def _decode(self, query, key, scaling):
        policy = self.policy
        if policy.scores_decode:
            grown = torch.nn.functional.pad(self.accumulated, (0, 1))
            self.accumulated = grown + scoring.attention_received(query, key, scaling)
        while self.get_seq_length() > self.capacity():
            self._drop(policy.decode_victim(self))

    def _fold(self, group: torch.Tensor) -> torch.Tensor:
        """Replace the prompt's slots by one slot per kept position (mean of what it holds)."""
        B, H, T, D = self.keys.shape
        positions = torch.arange(T, device=self.keys.device)
        is_kept = group == positions
        n_kept = int(is_kept[0].sum())
        kept = positions.expand(B, T)[is_kept].view(B, n_kept)
        if bool(((group == positions) | (group < 0)).all()):  # nothing merged: a gather
            index = kept[:, None, :, None].expand(B, H, n_kept, D)
            self.keys, self.values = self.keys.gather(2, index), self.values.gather(2, index)
        else:
            slot = torch.searchsorted(kept, group.clamp(min=0).contiguous())
            slot = torch.where(group >= 0, slot, n_kept)  # evicted tokens go to a spare slot
            self.keys, self.values = (_group_mean(x, slot, n_kept) for x in (self.keys, self.values))
        self.positions = kept
        return kept

    def _drop(self, slot: torch.Tensor):
        """Remove slot ``slot[b]`` of every sample ``b``."""
        B, H, S, D = self.keys.shape
        rest = torch.arange(S - 1, device=slot.device).expand(B, -1)
        rest = rest + (rest >= slot[:, None])
        self.evicted.append((self.forwards, self.positions.gather(1, slot[:, None])[:, 0]))
        if B == 1 or bool((slot == slot[0]).all()):
            # The common case (a fixed point, a sink window, batch 1): two slices copy half
            # the bytes of a gather, which also reads an int64 index as large as the cache.
            s = int(slot[0])
            self.keys, self.values = (torch.cat([x[:, :, :s], x[:, :, s + 1:]], dim=2)
                                      for x in (self.keys, self.values))
        else:
            index = rest[:, None, :, None].expand(B, H, S - 1, D)
            self.keys, self.values = self.keys.gather(2, index), self.values.gather(2, index)
        self.positions = self.positions.gather(1, rest)
        if self.accumulated is not None:
            self.accumulated = self.accumulated.gather(1, rest)

    # Keep the cache usable with generate() features that reshape the batch.
    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("elastic caches do not support beam search or num_return_sequences > 1")

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("elastic caches do not support beam search")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("elastic caches cannot be cropped (assisted decoding is not supported)")


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
    """True if some sample cannot see all keys from its last prompt token (left padding)."""
    if not isinstance(mask, torch.Tensor):
        return False
    last = mask[..., -1, :]
    return not bool(last.all() if mask.dtype == torch.bool else (last == 0).all())


class PolicyCache(Cache):
    """A transformers cache whose layers follow one :class:`~elastic.methods.Policy`.

    Layers are created lazily, one per decoder layer, on the first forward. After
    generating, :attr:`trace` tells what the cache did and :meth:`kv_bytes` what it holds.
    """

    def __init__(self, policy: Policy):
        super().__init__(layer_class_to_replicate=self._new_layer)
        self.policy = policy
        self.lengths: list[int] = []
        self.annotations: dict = {}

    def _new_layer(self) -> PolicyLayer:
        return PolicyLayer(self, len(self.layers))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far (not entries held): models derive default position ids from
        it, and positions must stay the true ones after compression."""
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].seen

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """Masks index the entries actually held, so their offset is the physical length."""
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].get_seq_length()

    def kv_bytes(self) -> int:
        """Bytes of the K/V tensors held now, all layers."""
        return sum(
            layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
            for layer in self.layers
            if layer.is_initialized
        )

    def annotate(self, **fields) -> None:
        """Attach prompt metadata (``spans``, ``image_grid``, ``tokens``) to the traces."""
        unknown = set(fields) - {"spans", "image_grid", "tokens"}
        if unknown:
            raise ValueError(f"unknown trace annotation(s): {sorted(unknown)}")
        self.annotations.update(fields)

    @property
    def trace(self) -> Trace:
        """The trace of the first (usually only) sequence in the batch."""
        return self.traces[0]

    @property
    def traces(self) -> list[Trace]:
        """One :class:`~elastic.trace.Trace` per sequence in the batch."""
        layers = [layer for layer in self.layers if layer.prompt_length is not None]
        if not layers:
            raise RuntimeError("the cache has not seen a prompt yet: run generate() with it first")
        first, policy = layers[0], self.policy
        T, batch = first.prompt_length, first.keys.shape[0]
        per_entry = self.kv_bytes() // max(1, first.get_seq_length() * batch)

        def numpy(t):
            return None if t is None else t.detach().float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy()

        scores = [numpy(layer.prefill_scores) for layer in layers]
        groups = [numpy(layer.prefill_group) for layer in layers]
        rows = [
            (step, layer.layer_idx, positions)
            for layer in layers
            for step, positions in ((s, numpy(p)) for s, p in layer.evicted)
        ]
        traces = []
        for b in range(batch):
            evictions = np.array([(s, l, p[b]) for s, l, p in rows], dtype=np.int64).reshape(-1, 3)
            layer_traces = [
                LayerTrace(
                    scores=None if s is None else s[b],
                    kept=np.flatnonzero(g[b] == np.arange(T)),
                    group=g[b].astype(np.int64),
                )
                for s, g in zip(scores, groups)
            ]
            traces.append(
                Trace(
                    method=policy.name,
                    budget=policy.budget,
                    start_size=policy.start_size,
                    distance=getattr(policy, "distance", None),
                    prompt_length=T,
                    protected=np.array(policy.protected(T), dtype=np.int64),
                    layers=layer_traces,
                    evictions=evictions[np.lexsort((evictions[:, 2], evictions[:, 1], evictions[:, 0]))],
                    lengths=list(self.lengths),
                    tokens_seen=first.seen,
                    fixed_point=policy.fixed_point(first.prompt_entries) if hasattr(policy, "fixed_point") else None,
                    bytes_per_entry=int(per_entry),
                    **self.annotations,
                )
            )
        return traces


def make_cache(method: str = "elastic", **params) -> PolicyCache:
    """A fresh cache for one ``generate`` call.

    Parameters
    ----------
    method : {"full", "elastic", "h2o", "local"}
    **params
        The policy's parameters: ``budget`` (fraction of KV entries kept, in (0, 1]),
        ``start_size`` (sink tokens), ``distance`` (Elastic's N_tl offset),
        ``recent_ratio`` (H2O). A parameter another method uses is ignored.
    """
    return PolicyCache(make_policy(method, **params))
