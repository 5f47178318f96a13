"""KV-cache memory of full-size models, without their weights.

    python -m elastic.memory                                  # LLaVA-1.5-7B, full and Elastic 0.2: 1k / 4k / 16k tokens, batch 1 and 8
    python -m elastic.memory --methods all --budgets 0.2 0.5  # every method in elastic.METHODS
    python -m elastic.memory --model qwen2-vl-2b --image-size 448 448
    python -m elastic.memory --model gemma-3-27b-it --methods full elastic h2o   # 5 of 6 layers slide

The model is built from its published configuration (``assets/configs/<name>``, no hub,
no weights) on the ``meta`` device: layers, KV heads and head size are read from the
built attention modules, the parameter count from the built parameters. The prompt is
split as the model's processor would split it (system text before the image, the image
tokens, then text up to the requested context). Every entry count comes from the
library itself: the policy's ``prompt_keep`` after the prefill, its ``capacity`` while
decoding (:func:`elastic.budget.keep_count` underneath), and a preallocated layer's
buffer of ``capacity(T + reserve) + 1`` slots (:class:`elastic.cache.PreallocatedLayer`).

Only the decoder's ``"full_attention"`` layers are compressed (what :mod:`elastic.cache`
does): the budget, the entry counts and the K/V bytes of every method are theirs. The
other layer types hold the same memory whatever the method, reported apart as
"window + state": a sliding-window or chunked layer of window ``W`` keeps the last
``min(tokens seen, W - 1)`` entries (transformers' ``DynamicSlidingWindowLayer``); a
linear-attention layer (Gated DeltaNet) keeps a conv state of ``(2 x key heads x key dim
+ value heads x value dim) x conv kernel`` values in the model's dtype and a recurrent
state of ``value heads x key dim x value dim`` in float32 (transformers' kernels keep it
in float32); a conv layer (LFM2) keeps ``hidden x conv_L_cache`` values. All of these are
read from the text configuration (``docs/memory.md``).

Methods that give every layer its own budget from the attention (PrefixKV, VL-Cache:
``budgets_per_layer``) cannot be split per layer without running the model. What the
library guarantees is the total after the prefill, :func:`elastic.budget.layer_total`,
and that is what the calculator reports for them (counts summed over the layers); the
end and buffer counts are those of the even split, which any split matches within one
entry per layer (each layer rounds its own ``ceil``).

Bytes are ``2 (K and V) x full-attention layers x KV heads x head_dim x entries x batch x
dtype bytes``.
Not counted: a preallocated layer's positions (int64) and, for scoring policies, its
per-entry scores (float32), one value per slot and row (under 0.1% of the K/V at
head_dim 128), activations, and the transient prefill (a layer holds its whole prompt
until it is compressed; methods that plan once all layers have attended hold every
layer's: the full cache's "KV after prefill").
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from . import budget as budget_rules
from .policies import METHODS, Prefill, make_policy

CONFIGS = Path(__file__).resolve().parent.parent / "assets" / "configs"
MODELS = ("llava-1.5-7b", "qwen2-vl-2b", "qwen2.5-vl-7b", "qwen3-vl-8b", "gemma-3-4b-it", "gemma-3-12b-it",
          "gemma-3-27b-it", "qwen3.5-9b", "lfm2.5-vl-1.6b")
WINDOW_TYPES = ("sliding_attention", "chunked_attention")  # K/V of the last W - 1 tokens
STATE_TYPES = ("linear_attention", "conv")  # a fixed-size state, not one entry per token

# Tokens before the image, as the model's chat template renders a one-image user turn. The
# tokenizers are not in the repository, so these are counted by hand from the templates (pass
# ``system=`` to override): llava-hf's "USER: <image>..." is <s>, "▁US", "ER", ":", "▁"
# before the image; Qwen2-VL's default system turn is <|im_start|>, "system", "\n", "You",
# " are", " a", " helpful", " assistant", ".", <|im_end|>, "\n", then <|im_start|>, "user",
# "\n", <|vision_start|>; Qwen2.5-VL's template has the same default system turn. Other model
# types count 0 tokens before the image unless ``system=`` / ``--system`` says otherwise.
SYSTEM_TOKENS = {"llava": 5, "qwen2_vl": 15, "qwen2_5_vl": 15}
DEFAULT_IMAGE = (448, 448)  # image size (height, width) for models whose token count depends on it


@dataclass
class ModelShape:
    """What the KV cache of a model depends on, read from a build on the ``meta`` device.

    Attributes
    ----------
    name : str
    model_type : str
        ``config.model_type`` (``"llava"``, ``"qwen2_vl"``, ``"gemma3"``, ...).
    layers, heads, kv_heads, head_dim, hidden : int
        The language model's decoder layers (all types), query heads, KV heads, head size
        (of its attention layers), width.
    parameters : int
        All parameters (vision tower and projector included).
    context : int or None
        The language model's ``max_position_embeddings``.
    config_dir : Path
    layer_types : tuple of str
        Each decoder layer's type, as transformers' caches read it.
    windows : tuple of int
        The window ``W`` of each sliding-window or chunked layer.
    state_values : int
        Values of the fixed conv states of all linear-attention and conv layers, one sample
        (stored in the model's dtype).
    recurrent_values : int
        Values of the recurrent states of all linear-attention layers, one sample (float32).
    """

    name: str
    model_type: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    parameters: int
    context: int | None
    config_dir: Path
    layer_types: tuple = ()
    windows: tuple = ()
    state_values: int = 0
    recurrent_values: int = 0

    @property
    def full_layers(self) -> int:
        """The full-attention layers: the ones the policies compress."""
        return sum(kind == "full_attention" for kind in self.layer_types) if self.layer_types else self.layers

    def entry_bytes(self, dtype_bytes: int = 2) -> int:
        """Bytes of one token's K and V in every full-attention layer, one sample."""
        return 2 * self.full_layers * self.kv_heads * self.head_dim * dtype_bytes

    def window_entries(self, seen: int) -> int:
        """Entries all sliding-window / chunked layers hold after ``seen`` tokens, one sample:
        ``min(seen, W - 1)`` each (transformers' ``DynamicSlidingWindowLayer``)."""
        return sum(min(seen, w - 1) for w in self.windows)

    def state_bytes(self, dtype_bytes: int = 2) -> int:
        """Bytes of the fixed state of the linear-attention and conv layers, one sample."""
        return self.state_values * dtype_bytes + self.recurrent_values * 4


def config_dir(model: str | Path) -> Path:
    """The configuration directory of ``model``: a name in :data:`MODELS`, or a directory."""
    path = CONFIGS / str(model) if str(model) in MODELS else Path(model)
    if not (path / "config.json").is_file():
        raise ValueError(f"no config.json for {model!r}: choose one of {', '.join(MODELS)} or pass a directory")
    return path


def build_meta(model: str | Path = "llava-1.5-7b", **text_overrides):
    """``AutoModelForImageTextToText`` built from the configuration on the ``meta`` device
    (no memory, no weights); ``text_overrides`` change the language model's configuration."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(config_dir(model))
    for key, value in text_overrides.items():
        setattr(config.get_text_config(), key, value)
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def decoder_layers(model):
    """The text decoder's layers of a vision-language model (``language_model`` or, for
    SmolVLM / Idefics3, ``text_model``)."""
    inner = getattr(model, "model", model)
    for name in ("language_model", "text_model"):
        decoder = getattr(inner, name, None)
        if decoder is not None and hasattr(decoder, "layers"):
            return decoder.layers
    raise ValueError(f"cannot find the text decoder's layers of {type(model).__name__}: pass a vision-language "
                     "model whose .model has a language_model or text_model")


def layer_types(text_config) -> tuple[list[str], list[dict]]:
    """Each decoder layer's type and cache keyword arguments, as transformers' caches read
    them (``get_layer_types_and_kwargs``: a model-wide ``sliding_window`` without
    ``layer_types`` makes every layer ``"sliding_attention"``)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    types, kwargs = get_layer_types_and_kwargs(text_config)
    return list(types), list(kwargs)


def state_values(text_config, kind: str) -> tuple[int, int]:
    """``(conv values, recurrent values)`` one layer of type ``kind`` keeps for one sample,
    from the text configuration (0, 0 for attention layers).

    Gated DeltaNet (``"linear_attention"``, Qwen3.5 / Qwen3-Next): a causal conv over the
    q, k and v channels, ``(2 x key heads x key dim + value heads x value dim) x kernel``,
    and one ``key dim x value dim`` state per value head. LFM2's short conv (``"conv"``):
    ``hidden x conv_L_cache``.
    """
    c = text_config
    if kind == "linear_attention":
        keys = c.linear_num_key_heads * c.linear_key_head_dim
        values = c.linear_num_value_heads * c.linear_value_head_dim
        return ((2 * keys + values) * c.linear_conv_kernel_dim,
                c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim)
    if kind == "conv":
        return c.hidden_size * c.conv_L_cache, 0
    return 0, 0


def shape_of(model, name: str = "", directory: Path | None = None) -> ModelShape:
    """:class:`ModelShape` of a built model (any device), read from its modules and its
    text configuration's layer types."""
    text = model.config.get_text_config(decoder=True)
    layers = decoder_layers(model)
    types, kwargs = layer_types(text)
    if len(types) != len(layers):
        raise ValueError(f"{len(types)} layer types for {len(layers)} decoder layers: fix the configuration")
    unknown = sorted(set(types) - {"full_attention", *WINDOW_TYPES, *STATE_TYPES})
    if unknown:
        raise ValueError(f"no memory rule for layer type(s) {unknown}; the calculator knows full_attention, "
                         f"{', '.join(WINDOW_TYPES + STATE_TYPES)}")
    attending = [i for i, kind in enumerate(types) if kind == "full_attention" or kind in WINDOW_TYPES]
    if not attending:
        raise ValueError("this decoder has no attention layer: there is no KV cache to compress")
    widths = set()
    for i in attending:  # every attention layer must have the same K/V width (one entry size)
        attention = layers[i].self_attn
        head_dim = int(attention.head_dim)
        widths.add((attention.k_proj.out_features // head_dim, head_dim))
    if len(widths) != 1:
        raise ValueError(f"attention layers with different K/V shapes {sorted(widths)}: not supported")
    ((kv_heads, head_dim),) = widths
    states = [state_values(text, kind) for kind in types]
    return ModelShape(
        name=name or model.config.model_type, model_type=model.config.model_type, layers=len(layers),
        heads=int(text.num_attention_heads), kv_heads=kv_heads, head_dim=head_dim, hidden=int(text.hidden_size),
        parameters=sum(p.numel() for p in model.parameters()),
        context=getattr(text, "max_position_embeddings", None), config_dir=directory or Path(),
        layer_types=tuple(types), windows=tuple(kw["sliding_window"] for kind, kw in zip(types, kwargs)
                                                if kind in WINDOW_TYPES),
        state_values=sum(conv for conv, _ in states), recurrent_values=sum(rec for _, rec in states),
    )


@lru_cache(maxsize=None)
def model_shape(model: str = "llava-1.5-7b") -> ModelShape:
    """:class:`ModelShape` of a model in :data:`MODELS` (or a configuration directory)."""
    return shape_of(build_meta(model), str(model), config_dir(model))


def image_tokens(shape: ModelShape, image_size: tuple[int, int] | None = None) -> int:
    """Tokens one image takes in the prompt, from the model's image processor configuration.

    LLaVA-1.5 resizes and crops every image to ``crop_size``: ``(crop / patch)^2`` tokens
    (the CLS token dropped). Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5 resize ``image_size``
    (height, width) to multiples of ``patch x merge`` within their pixel limits; ``merge^2``
    patches make one token (the directory's ``preprocessor_config.json`` if it has one, else
    transformers' processor defaults with the vision config's patch and merge sizes). Gemma 3
    gives every image ``mm_tokens_per_image`` tokens. LFM2-VL: one ``tile_size`` tile of
    ``encoder_patch_size`` patches merged ``downsample_factor^2`` to one (larger images are
    split into several tiles: pass ``image=``).
    """
    directory = shape.config_dir
    if shape.model_type == "llava":
        import json

        from transformers import CLIPImageProcessorPil

        crop = CLIPImageProcessorPil.from_pretrained(directory).crop_size
        processor = json.loads((directory / "processor_config.json").read_text())
        patch = processor["patch_size"]
        n = (crop.height // patch) * (crop.width // patch) + processor.get("num_additional_image_tokens", 0)
        return n - (processor.get("vision_feature_select_strategy") == "default")
    if shape.model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"):
        from transformers import AutoConfig, Qwen2VLImageProcessorPil

        if (directory / "preprocessor_config.json").is_file():
            processor = Qwen2VLImageProcessorPil.from_pretrained(directory)
        else:
            vision = AutoConfig.from_pretrained(directory).vision_config
            processor = Qwen2VLImageProcessorPil(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                                                 temporal_patch_size=vision.temporal_patch_size)
        height, width = image_size or DEFAULT_IMAGE
        return processor.get_number_of_image_patches(height, width) // processor.merge_size ** 2
    if shape.model_type in ("gemma3", "lfm2_vl"):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(directory)
        if shape.model_type == "gemma3":
            return int(config.mm_tokens_per_image)
        return (config.tile_size // config.encoder_patch_size // config.downsample_factor) ** 2
    raise ValueError(f"no image token rule for model type {shape.model_type!r}: pass image= (--image N)")


def prompt_spans(shape: ModelShape, tokens: int, image_size=None, system: int | None = None,
                 image: int | None = None) -> dict:
    """Token spans ``{"system", "image", "instruction"}`` of a ``tokens``-token prompt with
    one image (the layout :func:`elastic.generation.prompt_annotations` gives): ``system``
    tokens before the image (default :data:`SYSTEM_TOKENS`), ``image`` tokens (default
    :func:`image_tokens`), and text after it."""
    system = SYSTEM_TOKENS.get(shape.model_type, 0) if system is None else system
    image = image_tokens(shape, image_size) if image is None else image
    if tokens < system + image + 1:
        raise ValueError(f"{tokens} tokens cannot hold {system} system + {image} image tokens and any text")
    return {"system": (0, system), "image": (system, system + image), "instruction": (system + image, tokens)}


def dtype_bytes(dtype: str | torch.dtype) -> int:
    """Bytes per element of ``dtype`` (``"bfloat16"``, ``torch.float16``, ...)."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return torch.empty((), dtype=dtype).element_size()


@dataclass
class Row:
    """One method at one budget, context and batch size. Entry counts are summed over the
    layers, for one sample; bytes cover all layers and the whole batch.

    Attributes
    ----------
    layers : int
    prefill_entries : int
        Entries all layers keep after the prefill.
    end_entries : int
        Entries they hold after the last generated token was fed (``T + new - 1`` tokens seen).
    slots : int
        Slots of the preallocated layers' buffers (``capacity(T + reserve) + 1`` each).
    prefill_bytes, kv_bytes, allocated_bytes : int
        K/V held after the prefill, held at the end, and allocated in the buffers.
    layers : int
        The full-attention layers (the compressed ones); the counts and the three K/V byte
        fields above are theirs.
    window_entries, window_bytes, state_bytes : int
        What the other layers hold at the end, the same for every method: entries of all
        sliding / chunked layers (one sample), their K/V bytes, and the bytes of the
        linear-attention / conv states (whole batch).
    per_layer_budget : bool
        The method sets each layer's budget from the attention (PrefixKV, VL-Cache):
        ``prefill_entries`` is exact (:func:`elastic.budget.layer_total`), ``end_entries``
        and ``slots`` are those of the even split, within one entry per layer of any split.
    """

    model: str
    tokens: int
    spans: dict
    batch: int
    method: str
    budget: float
    new_tokens: int
    reserve: int
    layers: int
    prefill_entries: int
    end_entries: int
    slots: int
    prefill_bytes: int
    kv_bytes: int
    allocated_bytes: int
    weight_bytes: int
    dtype: str
    per_layer_budget: bool = False
    beyond_context: bool = False
    window_entries: int = 0
    window_bytes: int = 0
    state_bytes: int = 0

    @property
    def other_bytes(self) -> int:
        """Bytes of the layers no method compresses, whole batch, at the end: the sliding /
        chunked windows' K/V plus the linear-attention and conv states."""
        return self.window_bytes + self.state_bytes

    @property
    def cache_bytes(self) -> int:
        """The whole cache allocated at the end: compressed layers' buffers + :attr:`other_bytes`."""
        return self.allocated_bytes + self.other_bytes

    def span_tokens(self, name: str) -> int:
        start, end = self.spans.get(name, (0, 0))
        return end - start

    def count(self, entries: int) -> str:
        """``entries`` (summed over layers) as the table shows it: per layer when every
        layer holds the same number, else the total."""
        if self.per_layer_budget:
            return f"{entries} in all"
        return str(entries // self.layers)


def entries(method: str, budget: float, tokens: int, new: int, reserve: int | None = None,
            spans: dict | None = None, layers: int = 1, **params) -> dict:
    """Entry counts, summed over ``layers`` layers, of ``method`` at ``budget`` for a
    ``tokens``-token prompt and ``new`` generated tokens, from the policy's own arithmetic.

    Returns ``{"prefill", "end", "slots", "per_layer_budget"}``: entries after the prefill,
    after ``tokens + new - 1`` tokens seen, and preallocated slots for ``reserve`` decode
    tokens (default ``new``: ``make_cache(..., reserve=max_new_tokens)``, never regrown).
    ``params`` are the policy's other options.

    A policy with one budget for all layers keeps :meth:`~elastic.policies.Policy.prompt_keep`
    entries in every layer and holds :meth:`~elastic.policies.Policy.capacity`. A policy
    that gives each layer its own budget from the attention (``budgets_per_layer``) keeps
    :func:`elastic.budget.layer_total` entries in all after the prefill, whatever the
    attention; how they split over the layers is only known once the model has attended,
    so the end and slot counts are the even split's (:func:`elastic.budget.distribute` with
    equal weights), which every split matches within one entry per layer.
    """
    policy = make_policy(method, budget=budget, **params)
    reserve = new if reserve is None else reserve
    seen = tokens + max(new - 1, 0)

    def counts(layer_budget=None):
        prompt = Prefill(length=tokens, rows=1, device=torch.device("cpu"), spans=spans, budget=layer_budget)
        return (policy.prompt_keep(prompt), policy.capacity(seen, tokens, spans, layer_budget),
                policy.capacity(tokens + reserve, tokens, spans, layer_budget) + 1)

    if not policy.budgets_per_layer:
        prefill, end, slots = counts()
        return {"prefill": layers * prefill, "end": layers * end, "slots": layers * slots, "per_layer_budget": False}
    minimum = policy.min_entries(tokens, spans)
    total = budget_rules.layer_total(policy.budget, tokens, layers, minimum)
    split = budget_rules.distribute(total, [1.0] * layers, minimum, tokens)
    per_layer = [counts(budget_rules.layer_ratio(k, tokens)) for k in split]
    prefill, end, slots = (sum(c[i] for c in per_layer) for i in range(3))
    assert prefill == total  # prompt_keep(k / T) gives back k: the library's guarantee
    return {"prefill": prefill, "end": end, "slots": slots, "per_layer_budget": True}


def rows(model: str | Path | ModelShape = "llava-1.5-7b", tokens=(1024, 4096, 16384), batches=(1, 8),
         methods=("full", "elastic"), budgets=(0.2,), new: int = 512, dtype: str = "bfloat16",
         reserve: int | None = None, image_size=None, system: int | None = None,
         image: int | None = None, **params) -> list[Row]:
    """One :class:`Row` per context length x batch x method x budget (``full`` once).

    Parameters
    ----------
    model : str, Path or ModelShape
        A name in :data:`MODELS`, a configuration directory, or the shape of a built model.
    tokens : sequence of int
        Prompt lengths T (system + image + text).
    new : int
        Generated tokens.
    reserve : int, optional
        Decode tokens the preallocated buffers hold (default ``new``: they never regrow,
        as ``make_cache(..., reserve=max_new_tokens)``).
    image_size : (int, int), optional
        Image height and width, for models whose image token count depends on it.
    system, image : int, optional
        Tokens before the image (default :data:`SYSTEM_TOKENS`) and image tokens (default
        :func:`image_tokens`).
    **params
        The policies' other options (:func:`elastic.make_policy`; one set for every method).
    """
    shape = model if isinstance(model, ModelShape) else model_shape(model)
    if shape.full_layers == 0:
        raise ValueError(f"{shape.name} has no full-attention layer: no method compresses anything in it")
    size = dtype_bytes(dtype)
    per_entry = shape.entry_bytes(size) // shape.full_layers  # one token's K and V in one layer
    weights = shape.parameters * size
    reserve = new if reserve is None else reserve
    out = []
    for T in tokens:
        spans = prompt_spans(shape, T, image_size, system, image)
        counts = {(m, b): entries(m, b, T, new, reserve, spans, shape.full_layers, **params)
                  for m in methods for b in ((1.0,) if m == "full" else budgets)}
        window = shape.window_entries(T + max(new - 1, 0))  # the same whatever the method
        for batch in batches:
            for (method, budget), n in counts.items():
                out.append(Row(
                    model=shape.name, tokens=T, spans=spans, batch=batch, method=method, budget=float(budget),
                    new_tokens=new, reserve=reserve, layers=shape.full_layers,
                    prefill_entries=n["prefill"], end_entries=n["end"], slots=n["slots"],
                    prefill_bytes=per_entry * n["prefill"] * batch, kv_bytes=per_entry * n["end"] * batch,
                    allocated_bytes=per_entry * n["slots"] * batch, weight_bytes=weights, dtype=str(dtype),
                    per_layer_budget=n["per_layer_budget"],
                    beyond_context=shape.context is not None and T + new > shape.context,
                    window_entries=window, window_bytes=per_entry * window * batch,
                    state_bytes=shape.state_bytes(size) * batch,
                ))
    return out


def _gib(n: int) -> str:
    x = n / 2**30
    return f"{x:.3f}" if abs(x) >= 0.1 or x == 0 else f"{x:.4f}"


def headline(table: list[Row], method: str = "elastic", budget: float = 0.2) -> str:
    """A short markdown table: the full cache against ``method`` at ``budget``, per context
    and batch (allocated K/V of the compressed layers, the weights beside them, then what
    the other layers hold whatever the method and the share of the whole cache saved).
    Empty if either is missing."""
    full = {(r.tokens, r.batch): r for r in table if r.method == "full"}
    chosen = [r for r in table if r.method == method and abs(r.budget - budget) < 1e-9 and (r.tokens, r.batch) in full]
    if not chosen:
        return ""
    lines = [f"| context | batch | full KV allocated (GiB) | {method} {budget:g} KV allocated (GiB) | saved (GiB) | "
             "weights (GiB) | window + state, any method (GiB) | whole cache saved |",
             "|---|---|---|---|---|---|---|---|"]
    for r in chosen:
        f = full[(r.tokens, r.batch)]
        lines.append(f"| {r.tokens}{' †' if r.beyond_context else ''} | {r.batch} | {_gib(f.allocated_bytes)} | "
                     f"{_gib(r.allocated_bytes)} | {_gib(f.allocated_bytes - r.allocated_bytes)} | "
                     f"{_gib(r.weight_bytes)} | {_gib(r.other_bytes)} | "
                     f"{(f.cache_bytes - r.cache_bytes) / f.cache_bytes:.1%} |")
    return "\n".join(lines)


def format_table(table: list[Row]) -> str:
    """The rows as a markdown table; ratios are to the full cache of the same context and batch.
    Entry counts are per full-attention layer (``N in all``: summed over them, ‡); "window +
    state" is what the sliding / linear / conv layers hold, the same for every method."""
    full = {(r.tokens, r.batch): r for r in table if r.method == "full"}
    head = ("| context (system + image + text) | batch | method | budget | entries after prefill | entries at the end | "
            "buffer slots | KV after prefill (GiB) | KV at the end (GiB) | KV allocated (GiB) | allocated / full | "
            "saved vs full (GiB) | weights + cache (GiB) | window + state (GiB) | whole cache / full |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in table:
        f = full.get((r.tokens, r.batch))
        mark = " †" if r.beyond_context else ""
        split = " ‡" if r.per_layer_budget else ""
        ratio = f"{r.allocated_bytes / f.allocated_bytes:.3f}" if f else "-"
        saved = _gib(f.allocated_bytes - r.allocated_bytes) if f else "-"
        whole = f"{r.cache_bytes / f.cache_bytes:.3f}" if f else "-"
        prompt = f"{r.span_tokens('system')} + {r.span_tokens('image')} + {r.span_tokens('instruction')}"
        lines.append(
            f"| {r.tokens}{mark} ({prompt}) | {r.batch} | {r.method}{split} | {r.budget:g} | "
            f"{r.count(r.prefill_entries)} | {r.count(r.end_entries)} | {r.count(r.slots)} | "
            f"{_gib(r.prefill_bytes)} | {_gib(r.kv_bytes)} | {_gib(r.allocated_bytes)} | {ratio} | {saved} | "
            f"{_gib(r.weight_bytes + r.cache_bytes)} | {_gib(r.other_bytes)} | {whole} |"
        )
    return "\n".join(lines)


def describe(table: list[Row], shape: ModelShape | None = None) -> str:
    """The lines that go under the table: the model, the formula and the footnotes used."""
    if not table:
        return ""
    r = table[0]
    if shape is None and r.model in MODELS:
        shape = model_shape(r.model)
    lines = []
    if shape:
        full = shape.full_layers
        kinds = ", ".join(f"{shape.layer_types.count(k)} {k}" for k in dict.fromkeys(shape.layer_types)) \
            if shape.layer_types else f"{shape.layers} full_attention"
        lines.append(f"{shape.name}: {shape.layers} layers ({kinds}), {shape.heads} query / {shape.kv_heads} KV "
                     f"heads, head_dim {shape.head_dim}, {shape.parameters / 1e9:.2f}B parameters = "
                     f"{r.weight_bytes / 2**30:.2f} GiB of {r.dtype} weights (built on the meta device).")
        lines.append(f"KV bytes = 2 x {full} full-attention layers x {shape.kv_heads} KV heads x {shape.head_dim} x "
                     f"entries per layer x batch x {dtype_bytes(r.dtype)} bytes; {r.new_tokens} new tokens "
                     f"(the end: T + {r.new_tokens - 1} tokens fed), buffers of capacity(T + {r.reserve}) + 1 slots.")
        if shape.windows:
            windows = sorted(set(shape.windows))
            lines.append(f"Window + state: {len(shape.windows)} sliding/chunked layers keep min(tokens seen, W - 1) "
                         f"entries each (W = {', '.join(map(str, windows))}) at the end, the same for every "
                         "method: not compressed.")
        if shape.state_values:
            mib = shape.state_bytes(dtype_bytes(r.dtype)) / 2**20
            lines.append(f"Window + state: {shape.layers - full - len(shape.windows)} linear-attention/conv layers "
                         f"keep {shape.state_values} conv-state values ({r.dtype}) + {shape.recurrent_values} "
                         f"recurrent-state values (float32) per sample = {mib:.1f} MiB, whatever the context and "
                         "the method.")
    lines.append("Counts from the policies' own budget arithmetic (prompt_keep, capacity); the prefill briefly "
                 "holds a layer's whole prompt before compressing it (every layer's, for methods that plan "
                 "once all layers have attended).")
    if any(x.beyond_context for x in table):
        lines.append(f"† context + new tokens beyond the model's trained {shape.context if shape else '?'} "
                     "positions: memory arithmetic only.")
    if any(x.per_layer_budget for x in table):
        lines.append("‡ one budget per layer, set from the attention: how many entries each layer keeps is only "
                     "known once the model has attended, so counts are summed over the layers. After the prefill "
                     "the total is exact (elastic.budget.layer_total, guaranteed whatever the attention); the end "
                     "and buffer counts are the even split's, which any split matches within one entry per layer.")
    return "\n".join(lines)


def summary(models=MODELS, tokens=(1024, 4096, 16384), batch: int = 8, method: str = "elastic",
            budget: float = 0.2, **options) -> str:
    """A markdown table across models: the whole cache (compressed layers' buffers + window
    + state) of the full cache and of ``method`` at ``budget``, and the share of the full
    cache the policies can compress at all (the full-attention layers' K/V)."""
    lines = [f"| model | layers: full / sliding / linear or conv | context | full cache, batch {batch} (GiB) | "
             f"{method} {budget:g}, batch {batch} (GiB) | whole cache saved | compressible share of the full cache |",
             "|---|---|---|---|---|---|---|"]
    for name in models:
        shape = model_shape(name)
        kinds = f"{shape.full_layers} / {len(shape.windows)} / {shape.layers - shape.full_layers - len(shape.windows)}"
        table = rows(name, tokens, [batch], ["full", method], [budget], **options)
        for T in tokens:
            f, r = [x for x in table if x.tokens == T]
            lines.append(f"| {name} | {kinds} | {T}{' †' if f.beyond_context else ''} | {_gib(f.cache_bytes)} | "
                         f"{_gib(r.cache_bytes)} | {1 - r.cache_bytes / f.cache_bytes:.1%} | "
                         f"{f.allocated_bytes / f.cache_bytes:.1%} |")
    return "\n".join(lines)


def main(argv=None) -> list[Row]:
    ap = argparse.ArgumentParser(prog="python -m elastic.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llava-1.5-7b", help=f"{', '.join(MODELS)}, or a configuration directory")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384], help="prompt lengths")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.2])
    ap.add_argument("--methods", nargs="+", default=["full", "elastic"],
                    help=f"any of {', '.join(METHODS)}, or 'all'")
    ap.add_argument("--new", type=int, default=512, help="generated tokens")
    ap.add_argument("--reserve", type=int, default=None, help="decode tokens the buffers hold (default --new)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                    help=f"image height and width (Qwen-VL families; default {DEFAULT_IMAGE[0]} {DEFAULT_IMAGE[1]})")
    ap.add_argument("--system", type=int, default=None, help="tokens before the image (default: the chat template's)")
    ap.add_argument("--image", type=int, default=None, help="image tokens (default: from the image processor's config)")
    ap.add_argument("--summary", action="store_true",
                    help="one table across every model in assets/configs: full cache against the first of --methods "
                         "other than full at the first budget, batch = the last --batch")
    args = ap.parse_args(argv)
    methods = list(METHODS) if args.methods == ["all"] else [m for arg in args.methods for m in arg.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if args.summary:
        method = next((m for m in methods if m != "full"), "elastic")
        print(summary(MODELS, tuple(args.tokens), args.batch[-1], method, args.budgets[0], new=args.new,
                      dtype=args.dtype, reserve=args.reserve))
        return []
    try:
        table = rows(args.model, args.tokens, args.batch, methods, args.budgets, args.new, args.dtype, args.reserve,
                     tuple(args.image_size) if args.image_size else None, args.system, args.image)
    except ValueError as error:
        ap.error(str(error))
    short = headline(table, "elastic", args.budgets[0])
    if short:
        print(short)
        print()
    print(format_table(table))
    print()
    print(describe(table))
    return table


if __name__ == "__main__":
    main()
