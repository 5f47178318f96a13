"""One call from (image, prompt) to (answer, trace, stats), with the model's chat template.

This is where prompts are built; the token-type spans (system / image / instruction) and
image grids it stores in the trace for the visualisations come from :mod:`elastic.spans`.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from transformers import StoppingCriteria, StoppingCriteriaList

from .budget import keep_count
from .cache import PolicyCache, make_cache
from .scoring import check_layer_types, is_attached, text_config
from .spans import prompt_annotations  # noqa: F401 (also elastic.generation.prompt_annotations)
from .trace import Trace

MAX_IMAGE_SIDE = 2048  # larger uploads are scaled down first: processors resize anyway


@dataclass
class Generation:
    """What :func:`generate` returns."""

    text: str
    trace: Trace
    stats: dict
    cache: PolicyCache
    warnings: list[str] = field(default_factory=list)


def load_image(image, side: int | None = None) -> Image.Image:
    """An RGB PIL image from a path or PIL image; a clear ``ValueError`` if it is not one.

    Larger than ``MAX_IMAGE_SIDE`` it is scaled down (processors resize anyway). With ``side``
    (what the model's processor uses, :func:`image_side`) it is scaled down further, never
    below ``side`` pixels on its shorter side: the processor then sees the same pixels, and a
    huge upload never lives in memory at full size longer than its decoding (a JPEG is even
    decoded at the reduced scale).
    """
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as opened:
                if side:
                    opened.draft("RGB", (side, side))  # JPEG: decode at 1/2, 1/4, 1/8 scale; others ignore it
                opened.load()
                image = opened.copy()
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
            # name the file only: the full path of an upload means nothing to the user
            raise ValueError(f"{Path(image).name} is not a readable image") from None
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected an image file or PIL image, got {type(image).__name__}")
    if min(image.size) < 1:
        raise ValueError("the image is empty")
    scale = MAX_IMAGE_SIDE / max(image.size)
    if side:
        scale = min(scale, side / min(image.size))
    if scale < 1:
        size = tuple(max(1, round(n * scale)) for n in image.size)
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return image.convert("RGB")


def image_side(processor) -> int | None:
    """The most pixels the model's image processor uses on a side (its resize, crop, tile or
    pixel-budget sizes, whichever is largest); None for a text-only processor."""
    images = getattr(processor, "image_processor", None)
    if images is None:
        return None
    sides = []
    for attr in ("size", "crop_size", "max_image_size"):
        sizes = getattr(images, attr, None)
        sizes = dict(sizes) if isinstance(sizes, dict) else getattr(sizes, "__dict__", {}) if sizes is not None else {}
        for key, value in sizes.items():
            if isinstance(value, int) and key in ("height", "width", "shortest_edge", "longest_edge",
                                                    "max_height", "max_width"):
                sides.append(value)
            elif isinstance(value, int) and key == "max_pixels":
                sides.append(math.isqrt(value))
    if isinstance(getattr(images, "max_pixels", None), int):
        sides.append(math.isqrt(images.max_pixels))
    for pinpoint in getattr(images, "image_grid_pinpoints", None) or []:
        sides.extend(int(n) for n in pinpoint)
    return max(sides) if sides else None


def user_message(text: str, with_image: bool) -> dict:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def build_inputs(model, processor, messages: list[dict], image=None) -> tuple[dict, dict]:
    """Tokenise a chat (transformers message format) with the model's chat template.

    Returns the model inputs (on the model's device) and the prompt annotations for the
    trace: ``spans`` (system / image / instruction, and ``history`` for the earlier turns
    of a multi-turn chat: the instruction is then the last user turn), ``image_grid`` and
    ``image_tiles`` (see :mod:`elastic.spans`).
    """
    has_image_block = any(
        isinstance(m.get("content"), list) and any(b.get("type") == "image" for b in m["content"]) for m in messages
    )
    if image is not None and not has_image_block:
        raise ValueError("an image was given but no message has an image block")
    if image is None and has_image_block:
        raise ValueError("a message has an image block but no image was given")
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = tokenize_chat_text(model, processor, text, image)
    annotations = prompt_annotations(model, inputs)
    history = _history_length(model, processor, messages, image, inputs["input_ids"][0])
    if history:  # a multi-turn chat: earlier turns are history, the last user turn the instruction
        annotations["spans"] = split_history(annotations["spans"], history)
    return inputs, annotations


def _history_length(model, processor, messages, image, ids) -> int | None:
    """Tokens before the last user message (None for a single turn, or a template whose
    earlier turns are not a prefix of the whole chat)."""
    if len(messages) < 2 or messages[-1].get("role") != "user":
        return None
    earlier = messages[:-1]
    with_image = any(isinstance(m.get("content"), list) and any(b.get("type") == "image" for b in m["content"])
                     for m in earlier)
    text = processor.apply_chat_template(earlier, add_generation_prompt=False, tokenize=False)
    prefix = tokenize_chat_text(model, processor, text, image if with_image else None)["input_ids"][0]
    n = len(prefix)
    return n if 0 < n < len(ids) and bool((ids[:n] == prefix).all()) else None


def split_history(spans: dict, history: int) -> dict:
    """Spans with everything from ``history`` on as ``instruction`` and the text between the
    image (or the start) and ``history`` as ``history``."""
    start, end = spans["instruction"]
    if not start < history < end:
        return spans
    return {**{k: v for k, v in spans.items() if k != "instruction"},
            "history": (start, history), "instruction": (history, end)}


def tokenize_chat_text(model, processor, text: str, image=None) -> dict:
    """Model inputs (on the model's device) for an already rendered chat ``text``."""
    if hasattr(processor, "image_processor"):
        inputs = processor(text=[text], images=[image] if image is not None else None, return_tensors="pt")
    else:  # a text-only model: the processor is its tokenizer
        inputs = processor([text], return_tensors="pt", add_special_tokens=False)
    return {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def longest_token(tokenizer) -> int:
    """Characters in the tokenizer's longest token (computed once per tokenizer)."""
    if getattr(tokenizer, "_elastic_longest_token", None) is None:
        vocab = tokenizer.get_vocab()
        tokenizer._elastic_longest_token = max(
            (len(tokenizer.convert_tokens_to_string([t])) for t in vocab), default=1)
    return tokenizer._elastic_longest_token


def check_length(messages: list[dict], tokenizer, limit: int | None) -> None:
    """Refuse a chat whose text cannot fit the context, before tokenising it: every token
    covers at most ``longest_token`` characters, so longer text has too many tokens (and
    tokenising millions of characters takes seconds and gigabytes)."""
    if limit is None:
        return
    chars = sum(len(b.get("text", "")) if isinstance(b, dict) else len(str(b))
                for m in messages
                for b in (m["content"] if isinstance(m.get("content"), list) else [m.get("content") or ""]))
    if chars > limit * longest_token(tokenizer):
        raise ValueError(f"the conversation has {chars} characters, more than fit the model's context of "
                         f"{limit} tokens: shorten it")


def context_length(model) -> int | None:
    return getattr(text_config(model), "max_position_embeddings", None)


class _Clock:
    """Wall-clock time at the end of every forward (the first one is the prefill).

    Only forwards run by this thread count: app sessions may share one model."""

    def __init__(self, model):
        self.marks: list[float] = []
        self.device = model.device
        self.thread = threading.get_ident()
        self.handle = model.register_forward_hook(self._mark)

    def _mark(self, *_):
        if threading.get_ident() != self.thread:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.marks.append(time.perf_counter())

    def close(self):
        self.handle.remove()


class _Stop(StoppingCriteria):
    """Ends generation once ``event`` is set (checked after every token)."""

    def __init__(self, event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _compressed_positions(model, cache):
    """Feed every decoded token at the cache's length, as the reference code does."""
    if hasattr(getattr(model, "model", None), "get_rope_index"):
        raise ValueError("positions='compressed' is for 1-D RoPE models; Qwen2-VL's 3-D positions are not supported")

    def set_position(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[-1] == 1 and cache.layers:  # a decode step
            kwargs["position_ids"] = torch.full_like(ids, cache.decode_position(-1))
        return args, kwargs

    return model.register_forward_pre_hook(set_position, with_kwargs=True)


@torch.inference_mode()
def generate(model, processor, image, prompt, method: str = "elastic", budget: float = 0.5,
             max_new_tokens: int = 64, streamer=None, start_size: int = 1, distance: int = -25,
             positions: str = "true", stop=None, **policy_params) -> Generation:
    """Answer ``prompt`` about ``image`` with a compressed KV cache.

    Parameters
    ----------
    model, processor
        From :func:`elastic.load_model` (or any attached LLaVA / Qwen2-VL / causal LM).
    image : PIL image, path or None
    prompt : str or list of messages
        A question, or a whole chat in the transformers message format (the image goes with
        the message that has an ``{"type": "image"}`` block).
    method, budget, start_size, distance, **policy_params
        The cache policy, see :func:`elastic.make_cache`.
    max_new_tokens : int
    streamer : optional transformers streamer (e.g. ``TextIteratorStreamer``).
    positions : {"true", "compressed"}
        Decoded tokens at their true positions (default), or at the compressed cache's
        length as the reference code feeds them (to reproduce the paper's protocol; 1-D
        RoPE models only).
    stop : optional ``threading.Event``
        Setting it ends the generation after the current token; the result (text, trace,
        stats) then covers what was generated, and ``stats["stopped"]`` is True.
    """
    if not is_attached(model):
        raise RuntimeError("call elastic.attach(model) (or use elastic.load_model) before elastic.generate")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, float)) \
            or not math.isfinite(max_new_tokens) or int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)
    layer_types = check_layer_types(text_config(model))
    if "full_attention" not in layer_types:  # nothing to compress, nothing to trace: say so before any work
        raise ValueError(f"elastic.generate traces the full-attention layers, and this model has none (its layers "
                         f"are {', '.join(sorted(set(layer_types)))}: a model-wide sliding_window makes every layer "
                         "a sliding one). Load it with sliding_window=None, or call model.generate with "
                         "elastic.make_cache(...) (every layer keeps transformers' own window)")
    cache = make_cache(method, budget=budget, start_size=start_size, distance=distance, reserve=max_new_tokens,
                       positions=positions, **policy_params)
    image = load_image(image) if image is not None else None
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("the message is empty")
        messages = [user_message(prompt, image is not None)]
    else:
        messages = list(prompt)
    limit = context_length(model)
    tokenizer = getattr(processor, "tokenizer", processor)
    check_length(messages, tokenizer, limit)
    inputs, annotations = build_inputs(model, processor, messages, image)
    T = inputs["input_ids"].shape[1]
    if limit is not None and T + max_new_tokens > limit:
        raise ValueError(
            f"the prompt has {T} tokens; with {max_new_tokens} new tokens that exceeds the model's context of "
            f"{limit} tokens: shorten the conversation or lower max new tokens"
        )
    warnings = []
    policy = cache.policy
    spans = annotations["spans"]
    if keep_count(policy.budget, T, 0) < policy.min_entries(T, spans):  # what the budget alone keeps
        warnings.append(
            f"budget {policy.budget:g} keeps fewer than the {policy.min_entries(T, spans)} entries {method} needs "
            f"(protected tokens plus one); kept {keep_count(policy.budget, T, policy.min_entries(T, spans))} instead"
        )
    cache.annotate(**annotations)  # before the prefill: a policy may protect a span
    clock = _Clock(model)
    hook = _compressed_positions(model, cache) if cache.positions == "compressed" else None
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    start = time.perf_counter()
    try:
        output = model.generate(
            **inputs, cache=cache, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            stopping_criteria=StoppingCriteriaList([_Stop(stop)]) if stop is not None else None,
        )
    finally:
        clock.close()
        if hook is not None:
            hook.remove()
    new_ids = output[0, T:]
    text = tokenizer.decode(new_ids, skip_special_tokens=True).strip()
    all_ids = output[0].tolist()
    cache.annotate(tokens=[tokenizer.decode([i]) for i in all_ids], **annotations)
    trace = cache.trace
    marks = clock.marks
    prefill_s = marks[0] - start if marks else 0.0
    decode_s = marks[-1] - marks[0] if len(marks) > 1 else 0.0
    stats = {
        "prompt_tokens": T,
        "new_tokens": len(new_ids),
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "total_s": time.perf_counter() - start,
        "tokens_per_s": (len(marks) - 1) / decode_s if decode_s > 0 else float("nan"),
        # 1 / the median decode step: one slow step (a page fault, another thread) barely moves it
        "median_tokens_per_s": 1 / statistics.median(b - a for a, b in zip(marks[1:], marks[2:]))
        if len(marks) > 2 else float("nan"),
        "kv_bytes": cache.kv_bytes(),
        "full_kv_bytes": trace.bytes_per_entry * trace.tokens_seen,
        "peak_mem_bytes": torch.cuda.max_memory_allocated(model.device) if model.device.type == "cuda" else None,
        "stopped": bool(stop is not None and stop.is_set()),
    }
    return Generation(text=text, trace=trace, stats=stats, cache=cache, warnings=warnings)
