"""Checks at the door: what a request may carry before any heavy work runs.

Image paths (only uploads and shipped examples), numbers from API clients, the question's
length, the JSON body's size (an ASGI middleware), and the queue's size rule (only events
that wait for the model are refused when it is full).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import gradio as gr

from . import limits
from .defaults import EXAMPLES_DIR
from .limits import refused


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


def without_folder(error: Exception, path: str) -> str:
    """The error text without the server's upload folder (it means nothing to users)."""
    return str(error).replace(str(Path(path).parent) + os.sep, "")


def readable_image_input(component: gr.Image) -> gr.Image:
    """Make an image input answer unreadable uploads with a clear message, not a server error.

    Wraps the instance's ``preprocess`` (a subclass would make gradio write a ``.pyi``).
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
        except Exception:
            raise refused("That upload is not an image I can read.") from None

    component.preprocess = checked
    return component


def number_refusal(component: gr.Slider, value) -> str | None:
    """Why ``value`` cannot go into the slider ``component``, naming it (None: it can).
    :func:`explain_bad_inputs` asks it for every slider of every event, before gradio's own
    check (which names neither the field nor its range)."""
    span = f"{component.label} must be a number from {component.minimum:g} to {component.maximum:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{span}, got {str(value)[:40]!r}."
    if value < component.minimum:
        return f"{span}: {value} is less than minimum value {component.minimum}."
    if value > component.maximum:
        return f"{span}: {value} is greater than maximum value {component.maximum}."
    return None


def checked_text(question: str) -> str:
    """``question`` stripped; ``ValueError`` if it is too long or not valid text."""
    if len(question) > limits.MAX_QUESTION_CHARS:
        raise ValueError(f"The message has {len(question)} characters; the limit is {limits.MAX_QUESTION_CHARS}.")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("The message has characters that are not valid text (a lone surrogate).") from None
    return question.strip()


def index(value) -> int:
    """A slider position as an index; what is not a finite number (an API client's NaN,
    None or text) is 0. Figures clamp it to their range."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0
    return int(value) if math.isfinite(value) else 0


class RequestTooLarge:
    """ASGI middleware: refuse JSON request bodies over ``limit`` bytes before reading them
    (uploads go to gradio's upload route, which has its own cap)."""

    def __init__(self, app, limit: int | None = None):
        self.app, self.limit = app, limits.MAX_BODY_BYTES if limit is None else limit

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


def _field(component) -> tuple[str, str]:
    """(what an input is called, what it must be) for a refusal that names the field."""
    label = getattr(component, "label", None) or type(component).__name__
    if isinstance(component, gr.Chatbot):
        return "the chat history", ("a list of messages, each a dict with a 'role' ('user' or 'assistant') "
                                    "and a 'content' (text, or a file uploaded through the app)")
    if isinstance(component, gr.MultimodalTextbox):
        return "the message", "{'text': your question, 'files': [images uploaded through the app]}"
    if isinstance(component, gr.Image):
        return "the image", "an image uploaded through the app"
    if isinstance(component, gr.Slider):
        return label, f"a number from {component.minimum:g} to {component.maximum:g}"
    if isinstance(component, gr.CheckboxGroup):
        return label, "a list of: " + ", ".join(str(c[1] if isinstance(c, tuple) else c) for c in component.choices)
    if isinstance(component, (gr.Dropdown, gr.Radio)):
        return label, "one of: " + ", ".join(str(c[1] if isinstance(c, tuple) else c) for c in component.choices)
    if isinstance(component, gr.Checkbox):
        return label, "true or false"
    return label, "a value of the kind the page sends"


def _paths(value):
    """Every file path an input value names (FileData dicts, {"files": [...]}, message content)."""
    if isinstance(value, dict):
        if isinstance(value.get("path"), str):
            yield value["path"]
        for key in ("files", "content", "file", "value"):
            if key in value and not isinstance(value[key], str):
                yield from _paths(value[key])
            elif key in ("files", "file") and isinstance(value.get(key), str):
                yield value[key]
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from (_paths(item) if not isinstance(item, str) else ())


def _bad_path(block_fn, inputs) -> str | None:
    """The refusal for an input naming a file this server did not hand out (None: none does)."""
    for component, value in zip(block_fn.inputs, inputs):
        name = _field(component)[0].capitalize()
        files = value.get("files") if isinstance(value, dict) else None
        if isinstance(files, list) and any(isinstance(f, str) for f in files):
            return f"{name}: images must be uploaded through the app (file paths are not accepted)."
        try:
            for path in _paths(value):
                served_image(path)
        except ValueError as error:
            return f"{name}: {error}."
    return None


def _bad_number(components, inputs) -> str | None:
    """The refusal for a slider sent something other than a number in its range (the
    session's own slider: a layer slider's maximum is set per answer)."""
    reasons = (number_refusal(c, v) for c, v in zip(components, inputs) if isinstance(c, gr.Slider))
    return next((reason for reason in reasons if reason), None)


def _bad_value(block_fn, inputs) -> str | None:
    """The refusal for the first input gradio cannot take, naming it and its form."""
    for component, value in zip(block_fn.inputs, inputs):
        name, form = _field(component)
        model = getattr(component, "data_model", None)
        try:
            if model is not None and value is not None:
                model.model_validate(value)
        except Exception:
            return f"{name.capitalize()} was not understood: send {form} (got {str(value)[:60]!r})."
    return None


def _with_field(components, inputs, message: str) -> str:
    """gradio's own refusal of a value outside a menu's choices, with the menu's name in front
    and without the Python type it adds ("Value: 'x' (type: <class 'str'>) is not in ...")."""
    message = re.sub(r" \(type: <class '[^']*'>\)", "", message)
    for component, value in zip(components, inputs):
        if isinstance(component, (gr.Radio, gr.Dropdown)) and not getattr(component, "multiselect", False):
            choices = [c[1] if isinstance(c, tuple) else c for c in component.choices]
            if value not in choices and "not in the list of choices" in message:
                return f"{_field(component)[0].capitalize()}: {message}"
    return message


def explain_bad_inputs(blocks: gr.Blocks) -> None:
    """Answer inputs that gradio itself cannot take (a malformed chat history, a server path, a
    slider sent text) with a reason that names the field, not gradio's bare ``{"error": null}``
    and a traceback in the log: a refusal is one log line (``limits.refused``).

    Wraps the instance's ``preprocess_data``: gradio validates and moves files before any
    component's ``preprocess`` runs, so per-component wrappers never see these."""
    preprocess_data = blocks.preprocess_data

    async def checked(block_fn, inputs, state, explicit_call=False):
        current = [state[c._id] if state is not None and c._id in state else c for c in block_fn.inputs]
        # A server path (before gradio would try to move it into its cache), a slider sent text.
        reason = _bad_path(block_fn, inputs) or _bad_number(current, inputs)
        if reason:
            raise refused(reason)
        try:
            return await preprocess_data(block_fn, inputs, state, explicit_call)
        except gr.Error as error:
            if error.print_exception:  # gradio's own message: one log line, not a traceback
                raise refused(_with_field(current, inputs, error.message)) from None
            raise
        except Exception:
            sent_paths = any(True for value in inputs for _ in _paths(value))
            raise refused(_bad_value(block_fn, inputs)
                          or ("Images must be uploaded through the app (file paths are not accepted)."
                              if sent_paths else  # e.g. a shipped example's path: gradio moves only uploads
                              "The request's inputs were not understood: send what the page's own components send.")
                          ) from None

    blocks.preprocess_data = checked


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
