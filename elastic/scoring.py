"""Importance scores without eager attention, and the hook that hands them to the cache.

:func:`attach` registers an attention function that wraps the model's own one (sdpa by
default): the model's outputs still come from sdpa, and right after a full-attention
layer's attention the cache that was just updated gets the queries and keys, computes the
attention its entries received (:func:`attention_received`, chunked over queries, with
the mask and logit soft-capping the model itself applied) and compresses. ``attach`` also
registers a forward pre-hook that binds a :class:`~elastic.PolicyCache` handed to the
model to the text decoder's layer types before the first forward (and shows it the 2-D
padding mask).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import get_layer_types_and_kwargs
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .spans import annotating_hook

# Per thread (concurrent generations -- app sessions, streamer threads -- never mix):
# ``handler``/``layer``: the cache whose ``update`` ran last and the layer that now waits
# for its attention; ``mask``/``softcap``: the model's attention while that cache scores.
_local = threading.local()

_PREFIX = "elastic_"

# Every layer type transformers 5.24 gives the text decoders of the supported families
# (Gemma 3: sliding; Llama 4: chunked; Qwen3.5: linear attention; LFM2-VL: conv).
LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention", "linear_attention", "conv")


@dataclass
class Attention:
    """What one layer's attention call saw, handed to the cache that waits for it.

    Attributes
    ----------
    query : ``[B, H, q, D]`` after RoPE.
    key : ``[B, H_kv, S, D]`` the keys attended over (the cache's entries plus the new ones).
    mask : the 4-D mask the model passed (bool: True attends, or additive float), or None
        (plain causal).
    scaling : the softmax scale the model passed (None: ``D ** -0.5``).
    softcap : the logit soft-capping the model passed, or None. Gemma 2 passes its config's
        ``attn_logit_softcapping``; Gemma 3 keeps the field in its config but never passes
        it, so neither its attention nor the scores cap: the scores follow what the model
        does, not what its config says.
    config : the attention module's config (the text decoder's).
    """

    query: torch.Tensor
    key: torch.Tensor
    mask: torch.Tensor | None
    scaling: float | None
    softcap: float | None
    config: object = None


def expect_attention(layer_idx: int, handler) -> None:
    """Call ``handler(layer_idx, Attention)`` right after decoder layer ``layer_idx``'s
    next attention in this thread (what a cache's ``update`` asks for)."""
    _local.layer, _local.handler = layer_idx, handler


def _claim(layer_idx):
    """The handler waiting for ``layer_idx`` in this thread (and forget it), or None."""
    handler = getattr(_local, "handler", None)
    if handler is None or layer_idx is None or getattr(_local, "layer", None) != layer_idx:
        return None
    _local.handler = _local.layer = None
    return handler


@contextlib.contextmanager
def model_attention(mask: torch.Tensor | None = None, softcap: float | None = None):
    """While inside, :func:`attention_received` and :func:`attention_sparsity` calls that
    pass no ``mask``/``softcap`` use these: the mask and soft-capping of the layer whose
    attention the cache is scoring (so every policy follows the model's real attention
    without passing them on)."""
    saved = getattr(_local, "mask", None), getattr(_local, "softcap", None)
    _local.mask, _local.softcap = mask, softcap
    try:
        yield
    finally:
        _local.mask, _local.softcap = saved


def _visible(mask: torch.Tensor | None, q: int, S: int) -> torch.Tensor | None:
    """``[B', 1, 1, q, S]`` True where a query may attend, from the model's 4-D mask (its
    last ``q`` rows: policies score the prompt's last queries with the last rows), or None
    if there is no usable mask (then plain causal)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-1] != S or mask.shape[-2] < q:
        return None
    mask = mask[..., -q:, :]
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return allowed[:, :, None]  # [B', 1, 1, q, S]: broadcast over KV heads and query groups


def _causal_softmax(query: torch.Tensor, key: torch.Tensor, scaling: float | None, chunk: int,
                    mask: torch.Tensor | None = None, softcap: float | None = None):
    """Yield ``(start, stop, end, probs, hidden)`` per chunk of query rows: the float32
    softmax ``[B, H_kv, H / H_kv, stop - start, end]`` of rows ``start:stop`` (aligned with
    the last ``q`` keys) over the keys ``:end`` any of them can see, and ``hidden``, True
    where a row may not attend (broadcastable to ``probs``).

    Without ``mask`` the rows are causal; with the model's 4-D ``mask`` they see what the
    model let them see (sliding windows, Gemma 3's bidirectional image blocks). ``softcap``
    caps the logits as the model's eager attention does (``tanh(x / c) * c``)."""
    B, H, q, D = query.shape
    S, H_kv = key.shape[-2], key.shape[1]
    scaling = D ** -0.5 if scaling is None else scaling
    key = key.float()
    query = query.float().view(B, H_kv, H // H_kv, q, D)
    offset = S - q  # query i sits at key index offset + i
    cols = torch.arange(S, device=query.device)
    visible = _visible(mask, q, S)
    for start in range(0, q, chunk):
        stop = min(q, start + chunk)
        if visible is None:
            end = offset + stop  # causal: keys past the chunk's last query get nothing, skip them
            rows = torch.arange(offset + start, end, device=query.device)
            hidden = cols[None, :end] > rows[:, None]  # [chunk, end]
        else:
            seen = visible[..., start:stop, :].flatten(0, -2).any(dim=0)  # keys any row of the chunk sees
            end = int(seen.nonzero().max()) + 1 if bool(seen.any()) else 1
            hidden = ~visible[..., start:stop, :end]
        logits = torch.einsum("bgnqd,bgsd->bgnqs", query[:, :, :, start:stop], key[:, :, :end]) * scaling
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        # A row that sees nothing (padding) gets zeros, not NaN.
        probs = logits.masked_fill_(hidden, float("-inf")).softmax(dim=-1).nan_to_num_(0.0)
        yield start, stop, end, probs, hidden


def _context(mask, softcap):
    return (getattr(_local, "mask", None) if mask is None else mask,
            getattr(_local, "softcap", None) if softcap is None else softcap)


def attention_received(query: torch.Tensor, key: torch.Tensor, scaling: float | None = None,
                       chunk: int = 128, weights: torch.Tensor | None = None,
                       per_head: bool = False, mask: torch.Tensor | None = None,
                       softcap: float | None = None) -> torch.Tensor:
    """Attention each key receives, summed over the queries and averaged over query heads.

    Softmax of ``scaling * q k^T`` with a causal mask that aligns the ``q`` queries with the
    last ``q`` keys (a prefill of the whole prompt, its last few queries, or one decode
    step), or the model's own mask where it passed one. Computed ``chunk`` queries at a
    time in float32 against only the keys they can see (about half the work of the full
    square for a causal prefill), so the extra memory is ``B * heads * chunk * S`` floats.

    Parameters
    ----------
    query : ``[B, H, q, D]``, after RoPE.
    key : ``[B, H_kv, S, D]``, after RoPE; GQA heads are shared by ``H / H_kv`` queries.
    scaling : softmax scale, default ``D ** -0.5``.
    weights : optional ``[q]`` weight of each query's row in the sum (default all 1).
    per_head : return one score per KV head (mean over the query heads that share it).
    mask : the model's 4-D attention mask ``[B or 1, 1, >= q, S]`` (bool, True attends, or
        additive float); its last ``q`` rows are used. Default: the mask of the attention
        being scored (:func:`model_attention`), else causal.
    softcap : logit soft-capping ``tanh(x / c) * c`` (Gemma 2); default as ``mask``.

    Returns
    -------
    ``[B, S]`` float32, or ``[B, H_kv, S]`` with ``per_head``.
    """
    mask, softcap = _context(mask, softcap)
    B, H, q, D = query.shape
    S, H_kv = key.shape[-2], key.shape[1]
    if q == 1 and weights is None and _visible(mask, q, S) is None:
        return _one_query_received(query, key, scaling, softcap, per_head)
    received = torch.zeros(B, H_kv, S, dtype=torch.float32, device=query.device)
    for start, stop, end, probs, _ in _causal_softmax(query, key, scaling, chunk, mask, softcap):
        if weights is not None:
            probs = probs * weights[start:stop].to(probs)[:, None]
        received[:, :, :end] += probs.sum(dim=(2, 3))
    return received / (H // H_kv) if per_head else received.sum(dim=1) / H


def _one_query_received(query, key, scaling, softcap, per_head: bool) -> torch.Tensor:
    """:func:`attention_received` of a single query that sees every key (a decode step, which
    H2O, TOVA and SnapKV score in every layer): the chunked loop's float32 arithmetic in
    the same order, without its index tensors and masks (a handful of ops instead of ~30)."""
    B, H, _, D = query.shape
    H_kv = key.shape[1]
    scaling = D ** -0.5 if scaling is None else scaling
    logits = torch.matmul(query.float().view(B, H_kv, H // H_kv, D), key.float().transpose(-1, -2)) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    received = logits.softmax(dim=-1).sum(dim=2)  # [B, H_kv, S]
    return received / (H // H_kv) if per_head else received.sum(dim=1) / H


def attention_sparsity(query: torch.Tensor, key: torch.Tensor, scaling: float | None = None,
                       threshold: float = 0.01, chunk: int = 128, mask: torch.Tensor | None = None,
                       softcap: float | None = None) -> torch.Tensor:
    """Share of attention weights below ``threshold`` times their row's maximum (VL-Cache).

    Each of the ``q`` query rows (aligned with the last ``q`` keys, causal or under the
    model's mask as in :func:`attention_received`) counts only the keys it sees; the
    shares are averaged over rows and query heads. Returns ``[B]`` float32.
    """
    mask, softcap = _context(mask, softcap)
    B, H, q, D = query.shape
    share = torch.zeros(B, dtype=torch.float32, device=query.device)
    for start, stop, end, probs, hidden in _causal_softmax(query, key, scaling, chunk, mask, softcap):
        small = (probs < threshold * probs.amax(dim=-1, keepdim=True)) & ~hidden
        seen = (~hidden).sum(dim=-1).clamp(min=1).float()  # keys each row sees
        share += (small.sum(dim=-1) / seen).sum(dim=(1, 2, 3))
    return share / (H * q)


def _wrap(base_fn):
    def elastic_attention(module, query, key, value, attention_mask, **kwargs):
        handler = _claim(getattr(module, "layer_idx", None))
        if (handler is not None and isinstance(attention_mask, torch.Tensor) and query.shape[-2] == 1
                and attention_mask.shape[-1] != key.shape[-2]):
            # One mask is built for all full-attention layers, from the first one's length;
            # with one budget per layer, this layer holds another number of entries. A
            # compressed cache never holds padding, so a single decode query may see every
            # entry: no mask.
            attention_mask = None
        out = base_fn(module, query, key, value, attention_mask, **kwargs)
        if handler is not None:
            attention = Attention(query, key, attention_mask, kwargs.get("scaling"), kwargs.get("softcap"),
                                  getattr(module, "config", None))
            with model_attention(attention.mask, attention.softcap):
                handler(module.layer_idx, attention)
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


def layer_types(config) -> list[str]:
    """The text decoder's layer types as transformers' caches read them (a model-wide
    ``sliding_window`` without ``layer_types`` makes every layer ``sliding_attention``)."""
    return list(get_layer_types_and_kwargs(config)[0])


def check_layer_types(config) -> list[str]:
    """``layer_types(config)``, or a ``ValueError`` naming a type elastic cannot cache."""
    types = layer_types(config)
    for kind in types:
        if kind not in LAYER_TYPES:
            raise ValueError(
                f"this text decoder has {kind!r} layers, which elastic's cache does not handle; it supports "
                f"decoders whose layers are {', '.join(map(repr, LAYER_TYPES))} (use transformers' own cache "
                "for this model)"
            )
    return types


def _check_known_breakage(model) -> None:
    """Refuse a model whose own transformers code cannot run, with what to do instead."""
    if type(model).__name__ == "Llama4ForConditionalGeneration":
        from transformers.modeling_outputs import MoeCausalLMOutputWithPast

        if "image_outputs" not in MoeCausalLMOutputWithPast.__dataclass_fields__:
            raise ValueError(
                "Llama4ForConditionalGeneration cannot run in this transformers version: its forward reads "
                "outputs.image_outputs, which its language model's output (MoeCausalLMOutputWithPast) lacks. "
                "Attach its text decoder instead (elastic.attach(model.language_model), a Llama4ForCausalLM with "
                "the same chunked + full layers), or use a transformers release that fixes modeling_llama4.py"
            )


def _bind_cache(config):
    """Forward pre-hook: bind a policy cache handed to the model to ``config``'s layer types
    before the first forward (the model sizes its masks from the cache's layers), and show
    it the 2-D padding mask of the prompt."""

    def hook(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if getattr(cache, "prepared_by_attach", False):  # an elastic.cache.PolicyCache
            cache.prepare(config, kwargs.get("attention_mask"))
        return None

    return hook


def attach(model):
    """Let caches made by :func:`elastic.make_cache` see this model's attention.

    Switches only the text decoder to a wrapper of its current attention implementation
    (sdpa by default): outputs are unchanged, and each compressing cache layer gets its
    queries and keys right after the layer's attention. The vision tower is untouched.
    A forward pre-hook binds a cache passed to the model (``cache=``) to the decoder's
    layer types. Decoders may mix the layer types of :data:`LAYER_TYPES`; any other type
    raises ``ValueError``. Idempotent; returns the model.
    """
    if is_attached(model):
        return model
    config = text_config(model)
    check_layer_types(config)
    _check_known_breakage(model)
    base = config._attn_implementation or "sdpa"
    if base not in ("sdpa", "eager") and base not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise ValueError(f"cannot wrap attention implementation {base!r}; load the model with sdpa or eager")
    name = _register(base)
    key = _text_config_key(model)
    model.set_attn_implementation({key: name} if key else name)
    if not is_attached(model):
        raise RuntimeError(f"could not switch the text decoder of {type(model).__name__} to {name}")
    hooked = {id(model)}
    model.register_forward_pre_hook(_bind_cache(config), with_kwargs=True)
    model.register_forward_pre_hook(annotating_hook(model), with_kwargs=True)  # spans for plain generate
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if isinstance(decoder, torch.nn.Module) and id(decoder) not in hooked:  # called on its own (a manual loop)
        decoder.register_forward_pre_hook(_bind_cache(config), with_kwargs=True)
    return model
