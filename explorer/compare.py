"""Compare: one question and image, the full cache and the chosen methods at one budget.

The methods run one after another through the same :class:`~explorer.runner.Background` as
the chat (its time limit and Stop); the methods that ran are shown when it ends early.
"""

from __future__ import annotations

import html
import math
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

import elastic
import viz

from . import limits
from .defaults import BENCHMARKS_LINK, COMPARE_METHODS
from .guards import checked_text, served_image, without_folder
from .history import blocks, conversation, role
from .limits import refused
from .runner import Background, TextCollector
from .sessions import MODEL, session_of

WARMED: set[str] = set()  # methods this server has run once (the first run of each is slow)
TICK = 0.5  # seconds between the live answer's updates while a method runs (gradio may close it there)


def clean(stats: dict) -> dict:
    """JSON-safe stats (NaN -> None)."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in stats.items()}


def compare_methods(methods) -> tuple[str, ...]:
    """The methods to run, full cache first (its answer is the reference); a bare string or
    ``True`` (the old "also run Local" flag) is accepted from API clients."""
    if methods is True:
        methods = COMPARE_METHODS + ("local",)
    elif methods in (None, False):
        methods = COMPARE_METHODS
    elif isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",")]
    unknown = [m for m in methods if m not in elastic.METHODS]
    if unknown:
        raise refused(f"Unknown method(s) {', '.join(map(str, unknown))}: choose from {', '.join(elastic.METHODS)}.")
    chosen = [m for m in elastic.METHODS if m in methods and m != "full"]
    if not chosen:
        raise refused("Pick at least one method to compare with the full cache.")
    return ("full", *chosen)


def compare(image, question, budget, max_new_tokens, methods=COMPARE_METHODS, use_context=False, context=None,
            progress=gr.Progress(), request: gr.Request = None):
    """Answer one question with the full cache and each of ``methods`` at ``budget``
    (default: Elastic Cache and H2O), one method after another, each answer shown as it is
    written. Stop (or the time limit) ends it after the current method's current token; the
    methods that ran are shown.

    With ``use_context``, ``context`` (chat messages, as the chatbot holds them) comes
    before the question, as in the chat.

    Returns the side-by-side HTML, a JSON summary (``answers`` and ``metrics`` per method),
    the cache length of every method over the decoding steps, and the entries each layer of
    each method kept after the prefill (PrefixKV and VL-Cache give every layer its own budget).
    """
    if not image:
        raise refused("Add an image to compare on.")
    try:
        question = checked_text(str(question or ""))
    except ValueError as error:
        raise refused(str(error)) from None
    if not question:
        raise refused("Type a question to compare on.")
    turns = 0
    try:
        picture = elastic.load_image(served_image(image), side=MODEL.image_side())
        prompt = question
        if use_context and context:
            for turn in context:
                for path in blocks(turn)[1]:
                    served_image(path)
            prompt, context_image = conversation(context, question, None)
            if context_image is None and prompt[0]["role"] == "user":  # a text-only chat: the image goes first
                prompt[0] = elastic.user_message(prompt[0]["content"][-1]["text"], with_image=True)
            turns = sum(1 for m in prompt[:-1] if m["role"] == "user")
    except ValueError as error:
        raise refused(without_folder(error, str(image))) from None
    except (AttributeError, KeyError, TypeError, IndexError):
        raise refused("The context is not a chat history.") from None
    try:
        model, processor = MODEL.get()
    except elastic.ModelLoadError as error:
        raise refused(str(error)) from None
    methods = compare_methods(methods)
    heading = Heading(question, str(image), float(budget), turns)
    gens, warnings = [], []
    stop = session_of(request).stop
    stop.clear()
    # From here gradio can close this generator if the client leaves.
    yield heading.html() + progress_html(methods, gens, None, int(max_new_tokens)), *(gr.update(),) * 3
    timed_out, started = False, time.perf_counter()
    for i, method in enumerate(methods):
        if stop.is_set():
            break
        progress((i, len(methods)), desc=f"{viz.method_name(method)}…")
        streamer = TextCollector(getattr(processor, "tokenizer", processor))

        def answer(method=method, streamer=streamer):
            settings = dict(method=method, budget=1.0 if method == "full" else float(budget))
            if method not in WARMED:  # so the times shown are not the first run's
                elastic.generate(model, processor, picture, prompt, max_new_tokens=2, **settings)
                WARMED.add(method)
            streamer.started = time.perf_counter()
            return elastic.generate(model, processor, picture, prompt, max_new_tokens=int(max_new_tokens),
                                    stop=stop, streamer=streamer, **settings)

        run = Background(answer, stop, seconds=limits.MAX_SECONDS - (time.perf_counter() - started))
        try:
            for _ in run.ticks(TICK):  # the answer as it is written, with the method's progress
                yield (heading.html() + progress_html(methods, gens, streamer, int(max_new_tokens))
                       + side_by_side(methods, gens, streamer)), *(gr.update(),) * 3
        finally:
            run.close()
        timed_out = timed_out or run.timed_out
        try:
            gens.append(run.result())
        except Exception as error:  # a ValueError's own words, else a plain sentence (and a log line)
            raise refused(f"{viz.method_name(method)}: {limits.failure(error)}") from None
        heading.prompt_tokens = gens[0].stats["prompt_tokens"]
    if stop.is_set():
        why = f"the time limit of {limits.MAX_SECONDS:g} s" if timed_out else "Stop"
        cut = f"{viz.method_name(methods[len(gens) - 1])}'s answer cut short" if gens[-1].stats["stopped"] else ""
        not_run = ", ".join(map(viz.method_name, methods[len(gens):]))
        warnings.append(f"Ended by {why}: " + "; ".join(filter(None, [cut, not_run and f"not run: {not_run}"])) + ".")
    yield compared(gens, methods, question, budget, warnings, heading)


@dataclass
class Heading:
    """What a comparison answers: the question, the image, the budget and the context."""

    question: str
    image: str
    budget: float
    turns: int  # earlier questions of the chat given as context
    prompt_tokens: int | None = None  # known after the first method's prefill

    def html(self) -> str:
        context = (f"with the chat's {self.turns} earlier question{'s' * (self.turns != 1)} as context"
                   if self.turns else "without the chat's context")
        tokens = f": {self.prompt_tokens} prompt tokens" if self.prompt_tokens else ""
        return (f"<div class='ec-compare-head'><b>“{html.escape(self.question)}”</b> about "
                f"<code>{html.escape(Path(self.image).name)}</code>, budget {self.budget:g}, "
                f"{context}{tokens}</div>")


def progress_html(methods, gens, streamer, max_new_tokens: int) -> str:
    """One line: which methods are done, which one is writing (tokens so far), which wait."""
    parts = []
    for i, method in enumerate(methods):
        name = html.escape(viz.method_name(method))
        if i < len(gens):
            stats = gens[i].stats
            parts.append(f"{name}: done, {stats['new_tokens']} tokens in {stats['total_s']:.1f} s")
        elif i == len(gens) and streamer is not None:
            seconds = time.perf_counter() - streamer.started
            parts.append(f"<b>{name}: writing, {streamer.tokens} of at most {max_new_tokens} tokens "
                         f"({seconds:.0f} s)</b>")
        else:
            parts.append(f"{name}: waiting")
    return f"<div class='ec-compare-progress'>{' · '.join(parts)}</div>"


def side_by_side(methods, gens, streamer) -> str:
    """The answers so far: finished methods with their metrics, the running one as written."""
    results = [{"method": m, "text": g.text, "stats": clean(g.stats)} for m, g in zip(methods, gens)]
    if streamer is not None and streamer.text:
        results.append({"method": methods[len(gens)], "text": streamer.text + " …", "stats": {}})
    return viz.compare_html(results) if results else ""


# Compare's times, read honestly: what this prompt length allows (measured in docs/benchmarks.md).
SPEED_NOTE = (
    "<p class='ec-speed-note'>At a prompt of about 120 tokens, compression saves memory, not time: "
    "reading the model's weights dominates every decoding step, and a policy's own work is overhead "
    "(Elastic at 0.5 and the full cache decode within run-to-run spread of each other on this model: "
    "4.80 vs 5.18 s for 80 tokens). It saves time at long prompts and large batches: at 1024 + 512 tokens "
    "and budget 0.2, Elastic decodes 9% faster at batch 1 and 23% faster at batch 8 than the full cache "
    "(<a href='{link}' target='_blank'>docs/benchmarks.md</a>).</p>")


def compared(gens, methods, question, budget, warnings, heading: Heading | None = None):
    """The compare outputs for the generations that ran (full cache first). "KV kept" is
    shown against the Full column's bytes (the JSON keeps each method's own full size)."""
    results, traces = [], {}
    for method, gen in zip(methods, gens):
        warnings += [w for w in gen.warnings if w not in warnings]
        reference = results[0]["text"] if results else gen.text
        results.append({"method": method, "text": gen.text, "stats": clean(gen.stats),
                        "rouge_l": elastic.rouge_l(gen.text, reference)})
        traces[method] = gen.trace
    for w in warnings:
        gr.Warning(w)
    payload = {
        "question": question, "budget": float(budget),
        "answers": {r["method"]: r["text"] for r in results},
        "metrics": {r["method"]: {"rouge_l": r["rouge_l"], **{k: r["stats"].get(k) for k in (
            "prefill_s", "decode_s", "tokens_per_s", "median_tokens_per_s", "prompt_tokens", "new_tokens",
            "kv_bytes", "full_kv_bytes")}}
            for r in results},
        "warnings": warnings,
    }
    full_kv = results[0]["stats"].get("kv_bytes") if results and results[0]["method"] == "full" else None
    shown = [dict(r, stats=dict(r["stats"], full_kv_bytes=full_kv or r["stats"].get("full_kv_bytes")))
             for r in results]
    side = viz.compare_html(shown, float(budget)) + SPEED_NOTE.format(link=BENCHMARKS_LINK)
    return ((heading.html() if heading else "") + side, payload, viz.lengths_figure(traces),
            viz.layer_budgets_figure(traces))


def compare_started(image, question, budget, use_context, context):
    """On Run, at once (not queued): the old results go, and the heading says what runs."""
    turns = sum(1 for m in context or [] if isinstance(m, dict) and m.get("role") == "user") if use_context else 0
    heading = Heading(str(question or "").strip()[:200], str(image or ""), float(budget), turns)
    waiting = viz.message_figure("Running…")
    return heading.html() + "<p>Waiting for the model…</p>", None, waiting, waiting


def compare_from_chat(history, message, method, budget, max_new_tokens):
    """The compare inputs from the chat: its image, question (the one being typed, else the
    last one asked), budget, token limit, its method beside the defaults, and the earlier
    turns as context."""
    history = list(history or [])
    image, question, last_user = None, "", None
    for i, m in enumerate(history):
        texts, files = blocks(m)
        if role(m) == "user":
            image = files[-1] if files else image
            if texts:
                question, last_user = " ".join(texts), i
    files = (message or {}).get("files") or []
    text = ((message or {}).get("text") or "").strip()
    context = history if text else history[:last_user or 0]
    methods = [m for m in COMPARE_METHODS if m != "full"] + ([method] if method not in COMPARE_METHODS else [])
    turns = sum(1 for m in context if role(m) == "user")
    use = gr.update(value=bool(turns), visible=bool(turns),
                    label=f"With the chat's {turns} earlier question{'s' * (turns != 1)} and answers as context")
    return ((files[-1] if files else image), (text or question), budget, max_new_tokens, methods, use, context,
            gr.Tabs(selected="compare"))
