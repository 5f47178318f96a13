"""The bounds on what one request or client may cost, and the log line of a refusal.

Each bound is read when it is used (``limits.MAX_SECONDS``), so a test or a deployment can
change it on this module.
"""

from __future__ import annotations

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
# Seconds between the live panel's redraws while an answer streams (its timer; the streamer
# snapshots the trace twice as often). Each redraw costs the model about ... (docs/app.md).
LIVE_SECONDS = float(os.environ.get("ELASTIC_LIVE_SECONDS", 1.0))

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
