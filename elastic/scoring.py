"""Importance scores without eager attention, and the hook that hands them to the cache.

:func:`attach` registers an attention function that wraps the model's own one (sdpa by
default): the model's outputs still come from sdpa, and right after a layer's attention
the cache layer that was just updated gets the queries and keys, computes the attention
its entries received (:func:`attention_received`, chunked over queries) and compresses.
"""

from __future__ import annotations

import sys
import threading

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .spans import annotating_hook

# The cache layer whose ``update`` ran last in this thread and now waits for its attention.
# Thread-local so that concurrent generations (app sessions, streamer threads) never mix.
_waiting = threading.local()

_PREFIX = "elastic_"


def _causal_softmax(query: torch.Tensor, key: torch.Tensor, scaling: float | None, chunk: int):
    """Yield ``(start, stop, end, probs, future)`` per chunk of query rows: the float32
    causal softmax ``[B, H_kv, H / H_kv, stop - start, end]`` of rows ``start:stop`` (aligned
    with the last ``q`` keys) over the keys ``:end`` they can see, and its ``[rows, end]`` mask."""
    B, H, q, D = query.shape
    S, H_kv = key.shape[-2], key.shape[1]
    scaling = D ** -0.5 if scaling is None else scaling
    key = key.float()
    query = query.float().view(B, H_kv, H // H_kv, q, D)
    offset = S - q  # query i sits at key index offset + i
    cols = torch.arange(S, device=query.device)
    for start in range(0, q, chunk):
        stop = min(q, start + chunk)
        end = offset + stop  # causal: keys past the chunk's last query get nothing, skip them
        logits = torch.einsum("bgnqd,bgsd->bgnqs", query[:, :, :, start:stop], key[:, :, :end]) * scaling
        rows = torch.arange(offset + start, end, device=query.device)
        future = cols[None, :end] > rows[:, None]  # [chunk, end]
        yield start, stop, end, logits.masked_fill_(future, float("-inf")).softmax(dim=-1), future


def attention_received(query: torch.Tensor, key: torch.Tensor, scaling: float | None = None,
                       chunk: int = 128, weights: torch.Tensor | None = None,
                       per_head: bool = False) -> torch.Tensor:
    """Attention each key receives, summed over the queries and averaged over query heads.

    Softmax of ``scaling * q k^T`` with a causal mask that aligns the ``q`` queries with the
    last ``q`` keys (a prefill of the whole prompt, its last few queries, or one decode
    step). Computed ``chunk`` queries at a time in float32 against only the keys they can
    see (about half the work of the full square for a prefill), so the extra memory is
    ``B * heads * chunk * S`` floats.

    Parameters
    ----------
    query : ``[B, H, q, D]``, after RoPE.
    key : ``[B, H_kv, S, D]``, after RoPE; GQA heads are shared by ``H / H_kv`` queries.
    scaling : softmax scale, default ``D ** -0.5``.
    weights : optional ``[q]`` weight of each query's row in the sum (default all 1).
    per_head : return one score per KV head (mean over the query heads that share it).

    Returns
    -------
    ``[B, S]`` float32, or ``[B, H_kv, S]`` with ``per_head``.
    """
    B, H, q, D = query.shape
    S, H_kv = key.shape[-2], key.shape[1]
    received = torch.zeros(B, H_kv, S, dtype=torch.float32, device=query.device)
    for start, stop, end, probs, _ in _causal_softmax(query, key, scaling, chunk):
        if weights is not None:
            probs = probs * weights[start:stop].to(probs)[:, None]
        received[:, :, :end] += probs.sum(dim=(2, 3))
    return received / (H // H_kv) if per_head else received.sum(dim=1) / H


def attention_sparsity(query: torch.Tensor, key: torch.Tensor, scaling: float | None = None,
                       threshold: float = 0.01, chunk: int = 128) -> torch.Tensor:
    """Share of attention weights below ``threshold`` times their row's maximum (VL-Cache).

    Each of the ``q`` query rows (aligned with the last ``q`` keys, causal as in
    :func:`attention_received`) counts only the keys it sees; the shares are averaged over
    rows and query heads. Returns ``[B]`` float32.
    """
    B, H, q, D = query.shape
    share = torch.zeros(B, dtype=torch.float32, device=query.device)
    for start, stop, end, probs, future in _causal_softmax(query, key, scaling, chunk):
        small = (probs < threshold * probs.amax(dim=-1, keepdim=True)) & ~future
        seen = torch.arange(key.shape[-2] - q + start + 1, end + 1, device=query.device).float()  # keys each row sees
        share += (small.sum(dim=-1) / seen).sum(dim=(1, 2, 3))
    return share / (H * q)


def _wrap(base_fn):
    def elastic_attention(module, query, key, value, attention_mask, **kwargs):
        if (isinstance(attention_mask, torch.Tensor) and query.shape[-2] == 1
                and attention_mask.shape[-1] != key.shape[-2]):
            # One mask is built for all layers, from layer 0's length; with one budget per
            # layer, this layer holds another number of entries. A compressed cache never
            # holds padding, so a single decode query may see every entry: no mask.
            attention_mask = None
        out = base_fn(module, query, key, value, attention_mask, **kwargs)
        layer = getattr(_waiting, "layer", None)
        if layer is not None and layer.layer_idx == getattr(module, "layer_idx", None):
            _waiting.layer = None
            config = getattr(module, "config", None)
            layer.after_attention(query, key, attention_mask, kwargs.get("scaling"),
                                  getattr(config, "num_hidden_layers", None))
        return out

    elastic_attention.__name__ = f"{_PREFIX}{getattr(base_fn, '__name__', 'attention')}"
    return elastic_attention


def _model_eager(module, *args, **kwargs):
    """The eager attention of the module's own model file (transformers keeps one per model)."""
    return sys.modules[type(module).__module__].eager_attention_forward(module, *args, **kwargs)


def _register(base: str) -> str:
    name = f"{_PREFIX}{base}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        base_fn = _model_eager if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]
        AttentionInterface.register(name, _wrap(base_fn))
        # Without a mask function of the same name the model would build no causal mask.
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def _text_config_key(model) -> str | None:
    """Sub-config holding the language model (None: the model is a text-only LM)."""
    subs = getattr(model.config, "sub_configs", {}) or {}
    for key in ("text_config", "language_config", "llm_config"):
        if key in subs:
            return key
    return None


def text_config(model):
    key = _text_config_key(model)
    return getattr(model.config, key) if key else model.config


def is_attached(model) -> bool:
    impl = text_config(model)._attn_implementation or ""
    return impl.startswith(_PREFIX)


def attach(model):
    """Let caches made by :func:`elastic.make_cache` see this model's attention.

    Switches only the text decoder to a wrapper of its current attention implementation
    (sdpa by default): outputs are unchanged, and each compressing cache layer gets its
    queries and keys right after the layer's attention. The vision tower is untouched.
    Idempotent; returns the model.
    """
    if is_attached(model):
        return model
    config = text_config(model)
    for kind in getattr(config, "layer_types", None) or []:
        if kind != "full_attention":
            raise ValueError(
                f"elastic supports decoders whose layers all use full attention; this one has {kind!r} layers"
            )
    base = config._attn_implementation or "sdpa"
    if base not in ("sdpa", "eager") and base not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise ValueError(f"cannot wrap attention implementation {base!r}; load the model with sdpa or eager")
    name = _register(base)
    key = _text_config_key(model)
    model.set_attn_implementation({key: name} if key else name)
    if not is_attached(model):
        raise RuntimeError(f"could not switch the text decoder of {type(model).__name__} to {name}")
    model.register_forward_pre_hook(annotating_hook(model), with_kwargs=True)  # spans for plain generate
    return model
