"""Elastic Cache Explorer: chat with a vision-language model and watch its KV cache.

    python app.py                                  # the shipped SmolLM2 with eyes, CPU, offline
    python app.py --model llava-hf/llava-1.5-7b-hf --share

This file only wires components: answers come from :func:`elastic.generate`, figures from
:mod:`viz`. Per-session traces live in ``SESSIONS`` (keyed by the gradio session hash,
removed on unload), never in ``gr.State``.
"""

from __future__ import annotations

# ZeroGPU wants `spaces` imported before torch; elsewhere GPU() is a no-op decorator.
try:
    import spaces

    def gpu(fn):
        return spaces.GPU(duration=120)(fn)
except ImportError:  # not on a Hugging Face Space
    def gpu(fn):
        return fn

import argparse
import json
import logging
import math
import os
import statistics
import sys
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
from transformers import TextIteratorStreamer

import elastic
import viz
from elastic.policies import elastic_cache
from elastic.quantize import QUANTIZE_CHOICES

ROOT = Path(__file__).resolve().parent
EXAMPLES_DIR = ROOT / "assets" / "examples"
# Bounds on what one request or client may cost (each refusal is a clear message).
MAX_SESSIONS = 200  # API clients never "unload": bound the memory they can hold
MAX_SESSIONS_PER_CLIENT = 20  # so one client evicts only its own sessions
MAX_QUESTION_CHARS = 4000  # checked before tokenising
MAX_BODY_BYTES = 1 << 20  # JSON requests; uploads have their own 20 MB cap
MAX_SECONDS = float(os.environ.get("ELASTIC_MAX_SECONDS", 120))  # per request, then it stops
QUEUE_SIZE = int(os.environ.get("ELASTIC_QUEUE_SIZE", 16))  # waiting requests; more get "busy"
# Generations at once. 1 by default, so each answer streams at the model's own speed; on 2 CPU
# cores 2 at once served 8 clients in 32 s instead of 45 (bench/soak_app.py, docs/benchmarks.md).
CONCURRENCY = int(os.environ.get("ELASTIC_CONCURRENCY", 1))
COMPARE_METHODS = ("full", "elastic", "h2o")
# The Explore tab's first settings; examples.json's ``default_right`` is measured with them.
DEFAULT_METHOD, DEFAULT_BUDGET, DEFAULT_MAX_NEW_TOKENS = "elastic", 0.5, 160
ABLATION_CHOICES = {"importance": elastic_cache.IMPORTANCE, "scope": elastic_cache.SCOPES,
                    "prefill": elastic_cache.PREFILLS, "decode": elastic_cache.DECODES,
                    "protect": elastic_cache.PROTECTS}
EMPTY = "(empty answer)"
# Chat updates per second while streaming: each costs the server about 0.1 s through gradio's
# queue, which the model's decoding pays for (docs/benchmarks.md: 10 Hz 5.5 tok/s, 3 Hz 7.4, 1 Hz 10.1).
STREAM_HZ = float(os.environ.get("ELASTIC_STREAM_HZ", 3))
GENERATING: set[threading.Thread] = set()  # generation threads running now (chats' and compares')
DURATIONS: deque[float] = deque(maxlen=20)  # seconds of the last answers, for the waiting estimate


# A user's mistake is one line in the server log (gradio would print a traceback for each).
LOG = logging.getLogger("elastic.app")
if not LOG.handlers:
    _handler = logging.StreamHandler(sys.__stderr__)  # the process's stderr, whoever swapped sys.stderr
    _handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    LOG.addHandler(_handler)
    LOG.setLevel(logging.INFO)
    LOG.propagate = False


def refused(text: str) -> gr.Error:
    """The error to raise for a user's mistake: shown in the UI, one line in the log."""
    LOG.info("refused: %s", text)
    return gr.Error(text, print_exception=False)


# -- model and sessions ------------------------------------------------------------------------
class ModelSlot:
    """The one model of this server, loaded on first use (tests can :meth:`set` their own)."""

    def __init__(self, name: str | None = None, quantize: str | None = None):
        self.name, self.device, self.quantize = name, None, quantize
        self.model = self.processor = None
        self._lock = threading.Lock()

    def load(self, name: str | None = None, device: str | None = None, quantize: str | None = None):
        """Load ``name`` (default: the one given before); raises ``elastic.ModelLoadError``."""
        with self._lock:
            self.name, self.device = name or self.name, device or self.device
            self.quantize = quantize or self.quantize
            self.model, self.processor = elastic.load_model(self.name, device=self.device, quantize=self.quantize)
        return self.model, self.processor

    def set(self, model, processor):
        self.model, self.processor = elastic.attach(model), processor

    def get(self):
        with self._lock:
            loaded = self.model is not None
        return (self.model, self.processor) if loaded else self.load()


MODEL = ModelSlot(os.environ.get("ELASTIC_MODEL"), os.environ.get("ELASTIC_QUANTIZE") or None)


@dataclass
class Session:
    """What one browser tab (or API client) last produced: plain data, no tensors."""

    trace: elastic.Trace | None = None
    image: object = None  # PIL image of the last answer, for the overlay
    stats: dict | None = None
    stop: threading.Event = field(default_factory=threading.Event)  # set by the Stop button
    client: str = ""  # the client's address: its sessions are capped on their own


SESSIONS: OrderedDict[str, Session] = OrderedDict()
_SESSIONS_LOCK = threading.Lock()


def session_of(request: gr.Request | None) -> Session:
    """The request's session (most recently used last). Over the caps the oldest session of
    the client holding the most goes, so one client filling the table evicts only its own."""
    key = getattr(request, "session_hash", None) or uuid.uuid4().hex
    client = getattr(getattr(request, "client", None), "host", None) or ""
    with _SESSIONS_LOCK:
        session = SESSIONS.pop(key, None) or Session(client=client)
        SESSIONS[key] = session
        while True:
            counts = {}
            for other in SESSIONS.values():
                counts[other.client] = counts.get(other.client, 0) + 1
            if len(SESSIONS) <= MAX_SESSIONS and counts[client] <= MAX_SESSIONS_PER_CLIENT:
                break
            heaviest = client if counts[client] > MAX_SESSIONS_PER_CLIENT else max(counts, key=counts.get)
            del SESSIONS[next(k for k, v in SESSIONS.items() if v.client == heaviest)]
    return session


def forget_session(request: gr.Request):
    with _SESSIONS_LOCK:
        SESSIONS.pop(request.session_hash, None)


def served_image(path) -> str:
    """``path`` if it is a file this server handed out: an upload (inside gradio's upload
    folder) or a shipped example. Anything else, e.g. a server path sent through the API
    without gradio's file marker, is refused with a message that says nothing about it."""
    folders = (Path(gr.utils.get_upload_folder()).resolve(), EXAMPLES_DIR.resolve())
    try:
        resolved = Path(str(path)).resolve()
        if any(resolved.is_relative_to(folder) for folder in folders):
            return str(resolved)
    except (OSError, ValueError, RuntimeError):
        pass
    raise ValueError("images must be uploaded through the app (file paths are not accepted)")


def readable_image_input(component: gr.Image) -> gr.Image:
    """Make an image input answer unreadable uploads with a clear message, not a server error.

    Wraps the instance's ``preprocess`` (a subclass would make gradio write an ``app.pyi``).
    """
    preprocess = component.preprocess

    def checked(payload):
        # Before gradio's preprocess, which would open whatever path an API payload names.
        path = payload.get("path") if isinstance(payload, dict) else getattr(payload, "path", None)
        if path is not None:
            try:
                served_image(path)
            except ValueError as error:
                raise refused(str(error)) from None
        try:
            return preprocess(payload)
        except Exception as error:
            raise refused("That upload is not an image I can read.") from None

    component.preprocess = checked
    return component


def checked_number(component: gr.Slider) -> gr.Slider:
    """Make a slider refuse what API clients may send instead of a number ("abc", None, NaN)
    with a message that names it; gradio's own bounds check follows."""
    preprocess = component.preprocess

    def checked(payload):
        if isinstance(payload, bool) or not isinstance(payload, (int, float)) or not math.isfinite(payload):
            raise refused(f"{component.label} must be a number from {component.minimum:g} to "
                           f"{component.maximum:g}, got {str(payload)[:40]!r}.")
        try:
            return preprocess(payload)
        except Exception as error:
            raise refused(f"{component.label}: {error}") from None

    component.preprocess = checked
    return component


def checked_text(question: str) -> str:
    """``question`` stripped; ``ValueError`` if it is too long or not valid text."""
    if len(question) > MAX_QUESTION_CHARS:
        raise ValueError(f"The message has {len(question)} characters; the limit is {MAX_QUESTION_CHARS}.")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("The message has characters that are not valid text (a lone surrogate).") from None
    return question.strip()


class RequestTooLarge:
    """ASGI middleware: refuse JSON request bodies over ``limit`` bytes before reading them
    (uploads go to gradio's upload route, which has its own cap)."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].endswith("/upload"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            body = json.dumps({"error": f"request body over {self.limit // 1024} KiB"}).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            return await send({"type": "http.response.body", "body": body})
        received = 0

        async def counted():  # a chunked body without a length is cut off at the limit
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise ValueError(f"request body over {self.limit} bytes")
            return message

        return await self.app(scope, counted, send)


# -- chat history <-> model messages -----------------------------------------------------------
def _blocks(message) -> tuple[list[str], list[str]]:
    """(texts, file paths) of a chatbot message in any of gradio's content shapes."""
    content = message["content"] if isinstance(message, dict) else message.content
    items = content if isinstance(content, list) else [content]
    texts, files = [], []
    for item in items:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and item.get("type") == "text":
            texts.append(item.get("text", ""))
        elif isinstance(item, dict) and ("path" in item or "file" in item):
            file = item.get("file") or item  # gradio_client sends {"file": "<path>"}
            files.append(file if isinstance(file, str) else file["path"])
    return texts, files


def conversation(history: list, question: str, new_image: str | None) -> tuple[list[dict], str | None]:
    """Model messages for ``history`` plus ``question``, and the image they are about.

    The model sees one image: its context starts at the last user turn that brought one
    (a new upload starts a new context; the earlier turns stay on screen).
    """
    turns, image = [], None
    for message in history:
        role = message["role"] if isinstance(message, dict) else message.role
        texts, files = _blocks(message)
        text = " ".join(texts)
        if role == "user" and files:
            turns, image = [], files[-1]
        if role == "user" and text:
            turns.append(elastic.user_message(text, with_image=bool(files)))
        elif role == "assistant":
            turns.append({"role": "assistant", "content": [{"type": "text", "text": text.replace(EMPTY, "")}]})
    if new_image is not None:
        turns, image = [], new_image
    turns.append(elastic.user_message(question, with_image=new_image is not None))
    if image is not None and turns[0]["role"] == "user" and turns[0]["content"][0]["type"] != "image":
        turns[0] = elastic.user_message(turns[0]["content"][-1]["text"], with_image=True)  # image sent alone
    return turns, image


# -- side panel ----------------------------------------------------------------------------------
def _index(value) -> int:
    """A slider position as an index; what is not a finite number (an API client's NaN,
    None or text) is 0. Figures clamp it to their range."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0
    return int(value) if math.isfinite(value) else 0


def render_panel(session: Session, layer, step, head=0):
    """Figures and teaching text for the session's last trace at ``layer`` / ``step``
    (and KV ``head``, for a policy that selects per head): the heatmap, groups, image
    overlay, timeline, explanation, the teaching tab's groups and timeline, and the budget
    per layer (``layer`` outlined)."""
    trace = session.trace
    if trace is not None and trace.per_head:
        trace = trace.of_head(min(max(_index(head), 0), len(trace.heads) - 1))
    if trace is None:
        empty = viz.message_figure("Send a message (or pick an example) to see the cache.")
        return empty, empty, empty, empty, viz.explain_html(None), empty, empty, empty
    layer = min(max(_index(layer), 0), trace.num_layers - 1)
    step = viz.resolve_step(trace, _index(step) if step is not None else None)
    groups = viz.merge_groups(trace, layer, step)
    timeline = viz.cache_timeline(trace, layer, step)
    # The teaching tab shows the same two figures next to the explanation.
    return (viz.attention_heatmap(trace), groups, viz.image_overlay(trace, session.image, layer, step), timeline,
            viz.explain_html(trace, layer), groups, timeline, viz.layer_budgets_figure(trace, layer=layer))


def on_slider(layer, step, head, request: gr.Request):
    session = session_of(request)
    heat, *rest = render_panel(session, layer, step, head)
    return (heat if session.trace is not None and session.trace.per_head else gr.update(), *rest)


def head_slider(trace):
    """The KV-head selector: shown only for a trace whose heads kept different entries."""
    if trace is None or not trace.per_head:
        return gr.update(visible=False, value=0)
    return gr.update(visible=True, maximum=len(trace.heads) - 1, value=0)


# -- chat ----------------------------------------------------------------------------------------
def _without_folder(error: Exception, path: str) -> str:
    """The error text without the server's upload folder (it means nothing to users)."""
    return str(error).replace(str(Path(path).parent) + os.sep, "")


def _small(image):
    image = image.copy()
    image.thumbnail((2 * viz.image.MAX_SIDE, 2 * viz.image.MAX_SIDE))
    return image


def _problem(text: str):
    LOG.info("refused: %s", text)
    gr.Warning(text)
    return f"⚠️ {text}"


@gpu
def chat(message, history, method, budget, start_size, distance, max_new_tokens, layer,
         importance="sum", scope="layer", prefill="merge", decode="fixed-point", protect="none",
         request: gr.Request = None):
    """Stream an answer into the chat; ``show_panel`` (chained after it) draws the side
    panel from the trace it leaves in the session. Bad input leaves the chat untouched.

    The chat text, the message box and the status are this event's only outputs: gradio
    rebuilds a component for every ``gr.update()`` output of every streamed message (about
    2 ms each, holding the GIL the model needs), so the figures are not among them
    (docs/benchmarks.md).

    ``importance`` ... ``protect`` are Elastic's ablation options (other methods ignore them).
    """
    history = list(history or [])
    message = message if isinstance(message, dict) else {}

    def refuse(text):
        return history, gr.update(), _problem(text)

    try:
        question = checked_text(str(message.get("text") or ""))
        files = [f if isinstance(f, str) else f.get("path") for f in message.get("files") or []]
        history_files = [f for turn in history for f in _blocks(turn)[1]]
    except ValueError as error:
        yield refuse(str(error))
        return
    except (AttributeError, KeyError, TypeError):
        yield refuse("The message or the conversation history is malformed.")
        return
    new_image = files[-1] if files else None
    try:
        for path in files + history_files:
            served_image(path)
        image = elastic.load_image(new_image) if new_image else None
    except ValueError as error:
        yield refuse(_without_folder(error, new_image or ""))
        return
    if not question:
        yield refuse("The message is empty: type a question about the image.")
        return
    # Without an image anywhere in the context the model answers as a plain chat LM.
    try:
        messages, image_path = conversation(history, question, new_image)
    except (AttributeError, KeyError, TypeError, IndexError):
        yield refuse("The conversation history is malformed.")
        return
    if image is None and image_path is not None:
        try:
            image = elastic.load_image(image_path)
        except ValueError as error:
            yield refuse(f"The conversation's image can no longer be read ({_without_folder(error, image_path)}); "
                         "upload it again.")
            return

    user_turn = {"role": "user", "content": ([{"path": new_image}] if new_image else []) + [question]}
    shown = history + [user_turn, {"role": "assistant", "content": ""}]
    note = " New image: the model's context restarts from this message." if new_image and history else ""
    yield shown, gr.update(value=None), f"Generating with {viz.method_name(method)}…{note}"

    try:
        model, processor = MODEL.get()
    except elastic.ModelLoadError as error:
        yield history, gr.update(value=message), _problem(str(error))
        return
    tokenizer = getattr(processor, "tokenizer", processor)
    stop = session_of(request).stop
    stop.clear()  # a Stop pressed before this answer started does not end it
    # No timeout: run() always ends the stream, and a big model's prefill can be slow.
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result = {}
    options = dict(importance=importance or "sum", scope=scope or "layer", prefill=prefill or "merge",
                   decode=decode or "fixed-point", protect=protect or "none")

    def run():
        GENERATING.add(threading.current_thread())
        try:
            result["gen"] = elastic.generate(
                model, processor, image, messages, method=method, budget=float(budget),
                start_size=int(start_size), distance=int(distance), max_new_tokens=int(max_new_tokens),
                streamer=streamer, stop=stop, **options)
        except Exception as error:  # reported in the UI below; the server keeps serving
            result["error"] = error
        finally:
            streamer.end()  # unblock the loop below even if generate failed before streaming
            GENERATING.discard(threading.current_thread())

    worker = threading.Thread(target=run, daemon=True)
    limit = threading.Timer(MAX_SECONDS, lambda: (result.update(timed_out=True), stop.set()))  # bounded time
    worker.start()
    limit.start()
    partial, last = "", 0.0
    generating = f"Generating with {viz.method_name(method)}… (Stop ends it){note}"
    streamed = False
    try:
        for chunk in streamer:
            partial += chunk
            # The chat text only, and at most STREAM_HZ times a second: every update costs a
            # round trip to the browser, which would otherwise slow the model down.
            if time.perf_counter() - last >= 1 / STREAM_HZ:
                last = time.perf_counter()
                shown[-1] = {"role": "assistant", "content": partial}
                yield shown, gr.update(), generating
        streamed = True  # the answer ended by itself (the worker may still be building its trace)
        if partial and shown[-1]["content"] != partial:
            # The whole answer as soon as it is written; the figures take a moment longer.
            shown[-1] = {"role": "assistant", "content": partial}
            yield shown, gr.update(), "Answer complete; the figures follow."
    finally:
        # When the client went away (gradio closes this generator at a yield): the model
        # stops after the current token instead of running to the limit unseen.
        if worker.is_alive() and not streamed:
            stop.set()
        worker.join()
        limit.cancel()
    if "error" in result:
        error = result["error"]
        text = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
        yield history, gr.update(value=message), _problem(f"No answer: {text}")
        return

    gen = result["gen"]
    DURATIONS.append(gen.stats["total_s"])
    session = session_of(request)
    # A display-sized copy is all the overlay needs (sessions may pile up).
    session.trace, session.image, session.stats = gen.trace, image and _small(image), gen.stats
    if result.get("timed_out"):
        gen.warnings.append(f"Stopped at the time limit of {MAX_SECONDS:g} s per request.")
    for w in gen.warnings:
        gr.Warning(w)
    shown[-1] = {"role": "assistant", "content": gen.text or EMPTY}
    yield shown, gr.update(), viz.summary_markdown(gen.trace, gen.stats, gen.warnings)


def show_panel(layer, request: gr.Request = None):
    """The side panel for the session's last answer (chained after ``chat``, API ``/panel``):
    the figures at ``layer`` and the last step, with the sliders' ranges; the placeholder
    when there is no answer yet."""
    session = session_of(request)
    if session.trace is None:
        reset = gr.update(maximum=1, value=0)
        return *render_panel(session, 0, 0), reset, reset, head_slider(None)
    steps, layers = session.trace.decode_steps, session.trace.num_layers
    layer = min(max(_index(layer), 0), layers - 1)
    return (*render_panel(session, layer, steps), gr.update(maximum=max(layers - 1, 1), value=layer),
            gr.update(maximum=max(steps, 1), value=steps), head_slider(session.trace))


def pending_panel():
    """The panel's placeholder from sending until ``show_panel`` draws the new answer's
    figures (not queued: shown at once; the explanation stays)."""
    pending = viz.message_figure("The figures follow when the answer ends.")
    return pending, pending, pending, pending, gr.update(), pending, pending, pending


def waiting_status(message) -> str:
    """The status while a question waits for the model (not queued: shown at once), with
    how long recent answers took, measured here (gradio's own estimate shows the place)."""
    text = (message.get("text") or "").strip() if isinstance(message, dict) else ""
    if not text:
        return ""
    short = text if len(text) <= 80 else text[:80] + "…"
    busy = len(GENERATING)
    typical = f"; answers here take about {statistics.median(DURATIONS):.0f} s" if DURATIONS else ""
    ahead = f" ({busy} running now{typical})" if busy else ""
    return f"⏳ Sent “{short}”; waiting for the model{ahead}."


def stop_generation(request: gr.Request = None):
    """End this session's generation after the current token; what was written stays."""
    session_of(request).stop.set()


def clear_chat(request: gr.Request):
    session = session_of(request)
    session.trace = session.image = session.stats = None
    reset = gr.update(maximum=1, value=0)  # no stale layer / step ranges from the last answer
    return [], None, "", *render_panel(session, 0, 0), reset, reset, head_slider(None)


# -- compare -------------------------------------------------------------------------------------
def _clean(stats: dict) -> dict:
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


def in_background(fn, stop: threading.Event, idle):
    """Run ``fn()`` in a thread and return its result, yielding ``idle`` while it runs.

    A generator, so gradio can close it when the client leaves (or a job is cancelled):
    then ``stop`` is set and the thread joined, and nothing runs on unseen.
    """
    result = {}

    def run():
        GENERATING.add(threading.current_thread())
        try:
            result["value"] = fn()
        except Exception as error:  # raised again in the caller's thread
            result["error"] = error
        finally:
            GENERATING.discard(threading.current_thread())

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.25)
            if worker.is_alive():
                yield idle
    finally:
        if worker.is_alive():
            stop.set()
        worker.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


WARMED: set[str] = set()  # methods this server has run once (the first run of each is slow)


@gpu
def compare(image, question, budget, max_new_tokens, methods=COMPARE_METHODS, use_context=False, context=None,
            progress=gr.Progress(), request: gr.Request = None):
    """Answer one question with the full cache and each of ``methods`` at ``budget``
    (default: Elastic Cache and H2O). Stop (or the time limit) ends it after the current
    method's current token; the methods that ran are shown.

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
    try:
        picture = elastic.load_image(served_image(image))
        prompt = question
        if use_context and context:
            for turn in context:
                for path in _blocks(turn)[1]:
                    served_image(path)
            prompt, context_image = conversation(context, question, None)
            if context_image is None and prompt[0]["role"] == "user":  # a text-only chat: the image goes first
                prompt[0] = elastic.user_message(prompt[0]["content"][-1]["text"], with_image=True)
    except ValueError as error:
        raise refused(_without_folder(error, str(image))) from None
    except (AttributeError, KeyError, TypeError, IndexError):
        raise refused("The context is not a chat history.") from None
    try:
        model, processor = MODEL.get()
    except elastic.ModelLoadError as error:
        raise refused(str(error)) from None
    methods = compare_methods(methods)
    gens, warnings = [], []
    stop = session_of(request).stop
    stop.clear()
    yield (gr.update(),) * 4  # from here gradio can close this generator if the client leaves
    timed = {}
    limit = threading.Timer(MAX_SECONDS, lambda: (timed.update(out=True), stop.set()))
    limit.start()
    try:
        for i, method in enumerate(methods):
            if stop.is_set():
                break
            progress((i, len(methods)), desc=f"{viz.method_name(method)}…")

            def answer(method=method):
                settings = dict(method=method, budget=1.0 if method == "full" else float(budget))
                if method not in WARMED:  # so the times shown are not the first run's
                    elastic.generate(model, processor, picture, prompt, max_new_tokens=2, **settings)
                    WARMED.add(method)
                return elastic.generate(model, processor, picture, prompt, max_new_tokens=int(max_new_tokens),
                                        stop=stop, **settings)
            try:
                gen = yield from in_background(answer, stop, (gr.update(),) * 4)
            except ValueError as error:
                raise refused(f"{viz.method_name(method)}: {error}") from None
            gens.append(gen)
    finally:
        limit.cancel()
    if stop.is_set():
        why = f"the time limit of {MAX_SECONDS:g} s" if timed else "Stop"
        cut = f"{viz.method_name(methods[len(gens) - 1])}'s answer cut short" if gens[-1].stats["stopped"] else ""
        not_run = ", ".join(map(viz.method_name, methods[len(gens):]))
        warnings.append(f"Ended by {why}: " + "; ".join(filter(None, [cut, not_run and f"not run: {not_run}"])) + ".")
    yield _compared(gens, methods, question, budget, warnings)


def _compared(gens, methods, question, budget, warnings):
    """The compare outputs for the generations that ran (full cache first)."""
    results, traces = [], {}
    for method, gen in zip(methods, gens):
        warnings += [w for w in gen.warnings if w not in warnings]
        reference = results[0]["text"] if results else gen.text
        results.append({"method": method, "text": gen.text, "stats": _clean(gen.stats),
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
    return (viz.compare_html(results, float(budget)), payload, viz.lengths_figure(traces),
            viz.layer_budgets_figure(traces))


def compare_from_chat(history, message, method, budget, max_new_tokens):
    """The compare inputs from the chat: its image, question (the one being typed, else the
    last one asked), budget, token limit, its method beside the defaults, and the earlier
    turns as context."""
    history = list(history or [])
    image, question, last_user = None, "", None
    for i, m in enumerate(history):
        texts, files = _blocks(m)
        role = m["role"] if isinstance(m, dict) else m.role
        if role == "user":
            image = files[-1] if files else image
            if texts:
                question, last_user = " ".join(texts), i
    files = (message or {}).get("files") or []
    text = ((message or {}).get("text") or "").strip()
    context = history if text else history[:last_user or 0]
    methods = [m for m in COMPARE_METHODS if m != "full"] + ([method] if method not in COMPARE_METHODS else [])
    turns = sum(1 for m in context if (m["role"] if isinstance(m, dict) else m.role) == "user")
    use = gr.update(value=bool(turns), visible=bool(turns),
                    label=f"With the chat's {turns} earlier question{'s' * (turns != 1)} and answers as context")
    return ((files[-1] if files else image), (text or question), budget, max_new_tokens, methods, use, context,
            gr.Tabs(selected="compare"))


# -- layout --------------------------------------------------------------------------------------
def examples_label(examples: list[dict]) -> str:
    """The examples' heading; it says which ones the default settings (``DEFAULT_METHOD`` at
    ``DEFAULT_BUDGET``) get wrong, as ``examples.json`` records (``default_right``, checked by
    a test)."""
    wrong = [str(i + 1) for i, e in enumerate(examples) if e.get("default_right") is False]
    which = "all of them" if len(wrong) == len(examples) else ", ".join(wrong)
    setting = f"{viz.method_name(DEFAULT_METHOD)} at {DEFAULT_BUDGET:g}"
    note = f" ({setting} gets {which} wrong: see why in the figures)" if wrong else ""
    return "Example scenes: click one, then press Enter" + note


def load_examples(folder: Path) -> list[dict]:
    """``examples.json`` of ``folder`` with absolute image paths ([] if there is none)."""
    path = Path(folder) / "examples.json"
    if not path.exists():
        return []
    return [dict(e, image=str(Path(folder) / e["image"])) for e in json.loads(path.read_text())]


INTRO = """## Elastic Cache Explorer: watch a compressed KV cache while a vision-language model answers
[Elastic Cache](https://arxiv.org/abs/2407.18121) merges unimportant prompt tokens into *anchors* and evicts at one
fixed point while decoding; the right panel shows what it kept. Model: **SmolLM2-135M-Instruct with eyes**, which
knows only **synthetic shape scenes** (a 3x3 grid of coloured shapes); without an image it chats as SmolLM2."""


RESIZE_JS = "() => { setTimeout(() => window.dispatchEvent(new Event('resize')), 50); }"


def build(examples_dir: Path = EXAMPLES_DIR) -> gr.Blocks:
    """The whole app (``examples_dir`` holds ``examples.json`` and its images)."""
    examples = load_examples(examples_dir)
    waiting = viz.message_figure("Send a message (or pick an example) to see the cache.")
    with gr.Blocks(title="Elastic Cache Explorer", fill_width=True) as blocks:
        gr.Markdown(INTRO)
        with gr.Tabs() as tabs:
            with gr.Tab("Explore", id="explore") as explore_tab:
                with gr.Row(equal_height=False):
                    with gr.Column(scale=4, min_width=340):
                        # First screen on a 1280x720 projector: examples, chat, box, method, budget.
                        msg = gr.MultimodalTextbox(
                            file_types=["image"], file_count="single", sources=["upload"], elem_id="msg",
                            placeholder="Ask about an image (drop or attach it here)…", show_label=False,
                            render=False)
                        if examples:
                            gr.Examples([[{"text": e["prompt"], "files": [e["image"]]}] for e in examples],
                                        inputs=[msg], label=examples_label(examples),
                                        example_labels=[f"{i + 1}. {e['prompt']}" for i, e in enumerate(examples)],
                                        elem_id="chat-examples")
                        with gr.Row():
                            method = gr.Dropdown([(viz.method_name(m), m) for m in elastic.METHODS],
                                                 value=DEFAULT_METHOD, label="Method", elem_id="method")
                            budget = checked_number(gr.Slider(0.05, 1.0, value=DEFAULT_BUDGET, step=0.05,
                                                              elem_id="budget", label="Budget (fraction kept)"))
                        status = gr.Markdown(label="status", elem_id="status")
                        chatbot = gr.Chatbot(label="Chat", height=170, elem_id="chatbot")
                        msg.render()
                        with gr.Accordion("Ablation: change one choice of Elastic Cache", open=False,
                                          elem_id="ablation"):
                            gr.Markdown("The defaults are the paper's method; each other value is one of its "
                                        "ablations or a control of ours (see docs/ablations.md).")
                            with gr.Row():
                                importance = gr.Dropdown(list(ABLATION_CHOICES["importance"]), value="sum",
                                                         label="Importance score")
                                scope = gr.Dropdown(list(ABLATION_CHOICES["scope"]), value="layer",
                                                    label="Score computed per")
                                prefill = gr.Dropdown(list(ABLATION_CHOICES["prefill"]), value="merge",
                                                      label="Non-anchors at the prefill")
                            with gr.Row():
                                decode = gr.Dropdown(list(ABLATION_CHOICES["decode"]), value="fixed-point",
                                                     label="Victim while decoding")
                                protect = gr.Dropdown(list(ABLATION_CHOICES["protect"]), value="none",
                                                      label="Also protect")
                        with gr.Row():
                            start_size = checked_number(gr.Slider(0, 16, value=1, step=1, label="Start size (sinks)"))
                            distance = checked_number(gr.Slider(-64, 0, value=-25, step=1,
                                                                label="Distance (N_tl offset)"))
                            max_new = checked_number(gr.Slider(1, 512, value=DEFAULT_MAX_NEW_TOKENS, step=1,
                                                               label="Max new tokens", elem_id="max-new"))
                        with gr.Row():
                            stop = gr.Button("Stop", size="sm", variant="stop", elem_id="stop")
                            clear = gr.Button("Clear chat", size="sm")
                            to_compare = gr.Button("Compare methods on this question", size="sm")
                    with gr.Column(scale=5, min_width=420):
                        with gr.Row():
                            layer = gr.Slider(0, 1, value=0, step=1, label="Layer", elem_id="layer")
                            step = gr.Slider(0, 1, value=0, step=1, label="Decoding step (replay)", elem_id="step")
                            head = gr.Slider(0, 1, value=0, step=1, label="KV head (this method keeps entries "
                                             "per head)", visible=False, elem_id="head")
                        with gr.Tabs():
                            with gr.Tab("Attention") as t_attention:
                                heatmap = gr.Plot(waiting, label="attention", show_label=False, elem_id="heatmap")
                            with gr.Tab("Anchors & groups") as t_groups:
                                groups = gr.Plot(waiting, label="groups", show_label=False, elem_id="groups")
                            with gr.Tab("Image") as t_image:
                                overlay = gr.Plot(waiting, label="image", show_label=False, elem_id="overlay")
                            with gr.Tab("Cache over time") as t_timeline:
                                timeline = gr.Plot(waiting, label="timeline", show_label=False, elem_id="timeline")
                                # Below the timeline, not a tab of its own: a seventh tab would not fit a
                                # 1280-pixel panel (gradio folds it, and "How it works", into a menu).
                                budgets = gr.Plot(waiting, label="budget per layer", show_label=False,
                                                  elem_id="budgets")
                            with gr.Tab("How it works") as t_how:
                                explain = gr.HTML(viz.explain_html(None), label="explanation", elem_id="explain")
                                teach_groups = gr.Plot(waiting, label="teaching groups", show_label=False)
                                teach_timeline = gr.Plot(waiting, label="teaching timeline", show_label=False)
            with gr.Tab("Compare", id="compare") as compare_tab:
                with gr.Row():
                    with gr.Column(scale=2):
                        c_image = readable_image_input(gr.Image(type="filepath", label="Image", height=260))
                        c_question = gr.Textbox(label="Question", lines=2, elem_id="compare-question")
                        c_budget = checked_number(gr.Slider(0.05, 1.0, value=0.3, step=0.05, label="Budget"))
                        c_max_new = checked_number(gr.Slider(1, 512, value=DEFAULT_MAX_NEW_TOKENS, step=1,
                                                             label="Max new tokens", elem_id="compare-max-new"))
                        c_methods = gr.CheckboxGroup(
                            [(viz.method_name(m), m) for m in elastic.METHODS if m != "full"],
                            value=[m for m in COMPARE_METHODS if m != "full"],
                            label="Methods beside the full cache", elem_id="compare-methods",
                            info="PrefixKV and VL-Cache give each layer its own budget: see the budget per layer "
                                 "below the answers.")
                        c_use_context = gr.Checkbox(False, visible=False, elem_id="compare-context",
                                                    label="With the chat's earlier turns as context")
                        c_context = gr.State(None)
                        with gr.Row():
                            c_run = gr.Button("Run side by side", variant="primary")
                            c_stop = gr.Button("Stop", variant="stop", elem_id="compare-stop")
                        if examples:
                            gr.Examples([[e["image"], e["prompt"]] for e in examples], inputs=[c_image, c_question],
                                        elem_id="compare-examples")
                    with gr.Column(scale=5):
                        c_html = gr.HTML(label="comparison", elem_id="compare-html")
                        c_lengths = gr.Plot(label="cache lengths", show_label=False)
                        c_budgets = gr.Plot(label="budget per layer", show_label=False, elem_id="compare-budgets")
                        with gr.Accordion("Answers and metrics (JSON, as the /compare API returns them)", open=False):
                            c_json = gr.JSON(label="Answers and metrics")

        panel = [heatmap, groups, overlay, timeline, explain, teach_groups, teach_timeline, budgets]
        controls = [method, budget, start_size, distance, max_new, layer, importance, scope, prefill, decode, protect]
        msg.submit(waiting_status, [msg], [status], queue=False, api_name=False, show_progress="hidden")
        msg.submit(pending_panel, None, panel, queue=False, api_name=False, show_progress="hidden")
        # The panel is drawn after the answer, by its own event (see chat() for why); like
        # every event that does not wait for the model, a full queue does not refuse it.
        msg.submit(chat, [msg, chatbot, *controls], [chatbot, msg, status],
                   api_name="chat", concurrency_id="model", concurrency_limit=CONCURRENCY
                   ).then(show_panel, [layer], [*panel, layer, step, head], api_name="panel", show_progress="hidden",
                          queue=False)
        # Not queued: it must get through while the chat holds the model's queue slot.
        stop.click(stop_generation, None, None, api_name="stop", queue=False)
        c_stop.click(stop_generation, None, None, api_name=False, queue=False)
        for slider in (layer, step, head):
            slider.change(on_slider, [layer, step, head], panel, api_name=False, show_progress="hidden",
                          trigger_mode="always_last")
        clear.click(clear_chat, None, [chatbot, msg, status, *panel, layer, step, head], api_name=False)
        chatbot.clear(clear_chat, None, [chatbot, msg, status, *panel, layer, step, head], api_name=False)
        c_run.click(compare, [c_image, c_question, c_budget, c_max_new, c_methods, c_use_context, c_context],
                    [c_html, c_json, c_lengths, c_budgets], show_progress_on=[c_html],  # one progress bar
                    api_name="compare", concurrency_id="model", concurrency_limit=CONCURRENCY)
        to_compare.click(compare_from_chat, [chatbot, msg, method, budget, max_new],
                         [c_image, c_question, c_budget, c_max_new, c_methods, c_use_context, c_context, tabs],
                         api_name=False)
        # A plot drawn while its tab was hidden has no width to fit; a resize on showing the
        # tab makes plotly fit it to the visible column again.
        for tab in (explore_tab, compare_tab, t_attention, t_groups, t_image, t_timeline, t_how):
            tab.select(None, None, None, js=RESIZE_JS, api_name=False, queue=False)
        blocks.unload(forget_session)
    return blocks


demo = build()

CSS = """
#chat-examples > .gallery { display: flex; flex-wrap: wrap; gap: 4px; }
#chat-examples .gallery-item { padding: 2px 6px; }
#status { min-height: 1.5em; }
.ec-compare > tbody > tr > td { border: 1px solid #ddd; }
.ec-compare table td { border: none !important; padding: 2px 8px !important; }
"""


def bound_only_model_events(blocks: gr.Blocks) -> None:
    """Apply the queue's ``max_size`` to the events that wait for the model (chat and
    compare) only. Gradio 6 puts every event through its queue and refuses any of them while
    it is full, even those with ``queue=False``: a class filling the queue would leave Stop,
    the panel of a finished answer and the sliders refused with "Queue is full"."""
    queue = blocks._queue
    push = queue.push
    exempt = {"running": 0, "limit": None}  # pushes in flight, and the limit they lifted

    async def push_bounded(body, request, username):
        fn = blocks.fns.get(body.fn_index) if body.fn_index is not None else None
        if fn is None or fn.concurrency_id == "model":
            return await push(body, request, username)
        # Room for this push (its size check runs before its first await); a model event
        # pushed while this one waits on a lock gets at most one extra place.
        if not exempt["running"]:
            exempt["limit"] = queue.max_size
        exempt["running"] += 1
        limit = exempt["limit"]
        queue.max_size = None if limit is None else max(limit, len(queue) + 1)
        try:
            return await push(body, request, username)
        finally:
            exempt["running"] -= 1
            if not exempt["running"]:
                queue.max_size = limit

    queue.push = push_bounded


def serve(blocks: gr.Blocks | None = None, **launch):
    """Queue and launch ``blocks`` (default: ``demo``) within the server's bounds; ``launch``
    adds or overrides ``Blocks.launch`` arguments (host, port; tests: ``prevent_thread_lock``)."""
    from starlette.middleware import Middleware

    blocks = blocks or demo
    blocks.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    bound_only_model_events(blocks)
    options = dict(css=CSS, theme=gr.themes.Soft(), max_file_size="20mb", allowed_paths=[str(EXAMPLES_DIR)],
                   state_session_capacity=MAX_SESSIONS, app_kwargs={"middleware": [Middleware(RequestTooLarge)]})
    return blocks.launch(**{**options, **launch})


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=os.environ.get("ELASTIC_MODEL"),
                        help="hub id, local path, scene-smollm2 (default) or tiny-llava, e.g. "
                             "llava-hf/llava-1.5-7b-hf, llava-hf/llava-1.5-13b-hf, Qwen/Qwen2-VL-2B-Instruct")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--quantize", default=os.environ.get("ELASTIC_QUANTIZE") or None, choices=QUANTIZE_CHOICES,
                        help="int8: weight-only int8 language model, faster decoding on a CPU (not the default)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    try:
        MODEL.load(args.model, args.device, args.quantize)
    except (elastic.ModelLoadError, ValueError) as error:  # ValueError: a setting that cannot work
        hint = "" if args.model or isinstance(error, ValueError) else " (./run.sh sets it up; or pass --model)"
        sys.exit(f"error: {error}{hint}")
    serve(server_name=args.host, server_port=args.port, share=args.share)
