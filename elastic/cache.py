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

Two storage layouts (the layer classes, in :mod:`elastic.layers`) make the same decisions:

* ``"preallocated"`` (default, :class:`PreallocatedLayer`): after the prefill the K/V live
  in buffers sized from the budget rule; a decode step writes the new entry in place and
  an eviction moves it into the evicted slot, so no step copies the cache. Slots are then
  no longer in position order (attention does not care: keys carry their RoPE), and
  policies choose victims by original position, never by slot index.
* ``"dynamic"`` (:class:`PolicyLayer`): ``torch.cat`` on every append and a two-slice copy
  on every eviction, slots always in position order. Kept as the reference layout.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, CacheLayerMixin
from transformers.cache_utils import LinearAttentionCacheLayerMixin, get_layer_types_and_kwargs

from . import scoring
from .budget import keep_count
from .layers import DEFAULT_RESERVE, PolicyLayer, PreallocatedLayer
from .policies import Policy, make_policy
from .trace import LayerTrace, Trace

LAYOUTS = ("preallocated", "dynamic")
POSITIONS = ("true", "compressed")  # where a decoded token sits (see PolicyCache.decode_position)

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
    "or a fixed state, and elastic compresses full-attention layers only, so {method!r} compresses "
    "nothing here and answers as the full cache does. Load the model with sliding_window=None to "
    "compress the whole context"
)

_NO_TRACE = (
    "this text decoder has no full-attention layer (its layers are {types}), so the cache compressed "
    "nothing and has no per-layer trace: kv_bytes() is 0 and state_bytes() holds the windows. Load the "
    "model with sliding_window=None for a compressed cache and its trace"
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

    # The attach hook (elastic.scoring) prepares a cache that says it wants it: scoring sits
    # below this module in the imports, so it cannot test isinstance(cache, PolicyCache).
    prepared_by_attach = True

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
        if self.layers:  # already filled lazily (a model called without the hook): all full attention only
            if any(kind != "full_attention" for kind in types):
                raise ValueError(_UNBOUND)
            self.layer_types = types  # the remaining layers are still created as they are reached
            self.step.last_layer = len(types) - 1
            self._bound_config = config
            return self
        full = [i for i, kind in enumerate(types) if kind == "full_attention"]
        if not full and self.policy.name != "full":  # runs, as the hybrids' other layers do; says so
            warnings.warn(_NOTHING_TO_COMPRESS.format(types=", ".join(sorted(set(types))), method=self.policy.name),
                          UserWarning, stacklevel=2)
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
        if self.layer_types is None and attention.config is not None:  # filled without the hook: bind now
            self.bind(attention.config)  # (raises if the decoder mixes layer types: too late to build them)
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
        if not layers and self.layer_types is not None and "full_attention" not in self.layer_types:
            raise ValueError(_NO_TRACE.format(types=", ".join(sorted(set(self.layer_types)))))
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
