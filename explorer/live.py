"""What a running generation shows before it ends: its text and its cache's trace so far.

``elastic.generate`` builds its cache inside the call; the model hands it to every forward
as the ``cache`` argument. :func:`watch_cache` adds one forward pre-hook to the model (once,
before serving) that notes that cache for the thread running the forward, and
:class:`LiveStreamer` -- the streamer of the generation, called in that same thread after
every token -- reads ``cache.trace`` there (between two steps, so the cache is consistent)
at most every ``every`` seconds. Other threads only read the snapshot it leaves.
"""

from __future__ import annotations

import threading
import time

from .runner import TextCollector

_THREAD = threading.local()  # the cache of the forward this thread last ran


def _note_cache(module, args, kwargs):
    _THREAD.cache = kwargs.get("cache")


def watch_cache(model) -> None:
    """Let :class:`LiveStreamer` find the cache of a generation on ``model`` (idempotent;
    call it before the model serves, not while it generates)."""
    if hasattr(model, "register_forward_pre_hook") and not getattr(model, "_explorer_watched", False):
        model.register_forward_pre_hook(_note_cache, with_kwargs=True)
        model._explorer_watched = True


class LiveStreamer(TextCollector):
    """The answer so far (:attr:`text`) and a snapshot of the cache's trace (:attr:`trace`,
    renewed at most every ``every`` seconds; :attr:`version` counts the snapshots).

    The first snapshot is taken right after the prefill (the first new token), so the
    prefill's figures can be drawn while the answer is being written.
    """

    def __init__(self, tokenizer, every: float = 0.5):
        super().__init__(tokenizer)
        self.every, self.trace, self.version, self._taken = every, None, 0, 0.0
        self.image = None  # the display copy of the answer's image, set by the chat
        self._prompt_tokens: list[str] = []
        self._ids: list[int] = []
        self._tokens: list[str] = []  # the generated ids' text, decoded as snapshots need it

    def put(self, value):
        prompt = self.next_tokens_are_prompt
        super().put(value)
        ids = value.reshape(-1).tolist()
        if prompt:
            self._prompt_tokens = [self.tokenizer.decode([i]) for i in ids]
            return
        self._ids += ids
        now = time.perf_counter()
        if self.trace is None or now - self._taken >= self.every:
            self._snapshot()
            self._taken = time.perf_counter()

    def _snapshot(self) -> None:
        cache = getattr(_THREAD, "cache", None)
        if cache is None or not hasattr(cache, "trace"):
            return
        # The tokens' text, for the figures' hover labels (generate adds it only at the end).
        self._tokens += [self.tokenizer.decode([i]) for i in self._ids[len(self._tokens):]]
        cache.annotate(tokens=self._prompt_tokens + self._tokens)
        self.trace = cache.trace
        self.version += 1
