"""The bounds on what one request or client may cost, and the log line of a refusal.

Each bound is read when it is used (``limits.MAX_SECONDS``), so a test or a deployment can
change it on this module.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

import gradio as gr

MAX_SESSIONS = 200  # API clients never "unload": bound the memory they can hold
MAX_SESSIONS_PER_CLIENT = 20  # so one client evicts only its own sessions
MAX_QUESTION_CHARS = 4000  # checked before tokenising
MAX_BODY_BYTES = 1 << 20  # JSON requests; uploads have their own 20 MB cap
MAX_SECONDS = float(os.environ.get("ELASTIC_MAX_SECONDS", 120))  # per request, then it stops
QUEUE_SIZE = int(os.environ.get("ELASTIC_QUEUE_SIZE", 16))  # waiting requests; more get "busy"
# Generations at once. 1 by default, so each answer streams at the model's own speed; on 2 CPU
# cores 2 at once served 8 clients in 32 s instead of 45 (bench/soak_app.py, docs/benchmarks.md).
CONCURRENCY = int(os.environ.get("ELASTIC_CONCURRENCY", 1))
# Chat updates per second while streaming: each costs the server about 0.1 s through gradio's
# queue, which the model's decoding pays for (docs/benchmarks.md: 10 Hz 5.5 tok/s, 3 Hz 7.4, 1 Hz 10.1).
STREAM_HZ = float(os.environ.get("ELASTIC_STREAM_HZ", 3))
# Seconds between the live panel's redraws while an answer streams (under a second: the page must
# follow the tokens at least once a second, and a tick takes a few ms; the streamer
# snapshots the trace twice as often). Its cost to streaming: bench/bench_live_panel.py (docs/app.md).
LIVE_SECONDS = float(os.environ.get("ELASTIC_LIVE_SECONDS", 0.8))

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


def problem(text: str) -> str:
    """A mistake reported without raising: a toast, one log line, and the status line's text."""
    LOG.info("refused: %s", text)
    gr.Warning(text)
    return f"⚠️ {text}"


def failure(error: Exception) -> str:
    """What a user reads when answering failed: a ``ValueError``'s own message (the library's
    errors say how to fix the input), else a plain sentence -- never an exception's class name
    or internals. The detail is one line in the server log."""
    if isinstance(error, ValueError):
        return str(error)
    detail = " ".join(str(error).split())[:300]
    LOG.error("failed: %s: %s", type(error).__name__, detail)
    return ("the model failed on this request (an internal error; the server logged it). "
            "Try other settings, another method or a new chat; if it keeps failing, please report it.")


try:  # glibc keeps freed memory in its arenas after a large image or a long prompt: hand it back
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
    _malloc_trim = None


def release_memory() -> None:
    """Return the memory freed by a finished request to the system (``malloc_trim``): without
    it, resident memory rose in steps with every large upload and never came back."""
    if _malloc_trim is not None:
        _malloc_trim(0)
