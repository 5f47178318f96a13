"""The server's one model, and what each browser tab (or API client) last produced.

A session holds plain data (the last trace as numpy, a small copy of the image, stats, the
Stop event), never tensors and never ``gr.State``: it lives in ``SESSIONS``, keyed by
gradio's session hash, dropped on unload, and capped (``limits.MAX_SESSIONS`` in all,
``limits.MAX_SESSIONS_PER_CLIENT`` per client address).
"""

from __future__ import annotations

import os
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import gradio as gr

import elastic

from . import limits
from .live import watch_cache


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
            watch_cache(self.model)
        return self.model, self.processor

    def set(self, model, processor):
        self.model, self.processor = elastic.attach(model), processor
        watch_cache(self.model)

    def get(self):
        with self._lock:
            loaded = self.model is not None
        return (self.model, self.processor) if loaded else self.load()

    def image_side(self) -> int | None:
        """Pixels the model's processor uses on a side, to shrink uploads to at the door
        (None before the model is loaded: then only the library's own cap applies)."""
        return elastic.generation.image_side(self.processor) if self.processor is not None else None


MODEL = ModelSlot(os.environ.get("ELASTIC_MODEL"), os.environ.get("ELASTIC_QUANTIZE") or None)


@dataclass
class Session:
    """What one browser tab (or API client) last produced: plain data, no tensors."""

    trace: elastic.Trace | None = None
    image: object = None  # PIL image of the last answer, for the overlay
    stats: dict | None = None
    stop: threading.Event = field(default_factory=threading.Event)  # set by the Stop button
    client: str = ""  # the client's address: its sessions are capped on their own
    live: object = None  # the answer being written: its LiveStreamer (text, trace snapshots)
    drawn: int = 0  # the live snapshot the panel last drew (LiveStreamer.version)
    prefill_drawn: set = field(default_factory=set)  # the answer's prefill views drawn live so far


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
            if len(SESSIONS) <= limits.MAX_SESSIONS and counts[client] <= limits.MAX_SESSIONS_PER_CLIENT:
                break
            heaviest = client if counts[client] > limits.MAX_SESSIONS_PER_CLIENT else max(counts, key=counts.get)
            del SESSIONS[next(k for k, v in SESSIONS.items() if v.client == heaviest)]
    return session


def forget_session(request: gr.Request):
    with _SESSIONS_LOCK:
        SESSIONS.pop(request.session_hash, None)


def stop_generation(request: gr.Request = None):
    """End this session's generation after the current token; what was written stays."""
    session_of(request).stop.set()
