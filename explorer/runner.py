"""The one background runner: a generation in a thread, bounded by the time limit and Stop.

Chat and Compare both run their model calls through :class:`Background`, from a gradio
generator handler that yields while the thread runs. Gradio closes such a generator at a
yield when its client goes away (a closed tab, a cancelled API job); :meth:`Background.close`
in the handler's ``finally`` then sets Stop and joins the thread, so nothing runs on unseen.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from transformers import TextStreamer

from . import limits

GENERATING: set[threading.Thread] = set()  # generation threads running now (chats' and compares')
DURATIONS: deque[float] = deque(maxlen=20)  # seconds of the last answers, for the waiting estimate


class Background:
    """Run ``fn()`` in a daemon thread at once; ``stop`` is set after ``seconds`` (default
    ``limits.MAX_SECONDS``; a request that runs several, like Compare, passes what is left).

    ``fn`` should end soon after ``stop`` is set (``elastic.generate(stop=...)`` does, after
    the current token).
    """

    def __init__(self, fn, stop: threading.Event, seconds: float | None = None):
        self.stop, self.timed_out = stop, False
        self._outcome: dict = {}
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._limit = threading.Timer(limits.MAX_SECONDS if seconds is None else max(seconds, 0.0),
                                      self._time_up)
        self._thread.start()
        self._limit.start()

    def _run(self, fn):
        GENERATING.add(threading.current_thread())
        try:
            self._outcome["value"] = fn()
        except Exception as error:  # raised again in the handler's thread by result()
            self._outcome["error"] = error
        finally:
            GENERATING.discard(threading.current_thread())

    def _time_up(self):
        self.timed_out = True
        self.stop.set()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def ticks(self, every: float):
        """Yield every ``every`` seconds while the thread runs (the caller shows progress)."""
        while self._thread.is_alive():
            self._thread.join(every)
            if self._thread.is_alive():
                yield

    def close(self) -> None:
        """Stop the thread if it still runs (its client left) and wait for it."""
        if self._thread.is_alive():
            self.stop.set()
        self._thread.join()
        self._limit.cancel()
        limits.release_memory()

    def result(self):
        """``fn``'s return value, or its exception raised here."""
        self.close()
        if "error" in self._outcome:
            raise self._outcome["error"]
        return self._outcome["value"]


class TextCollector(TextStreamer):
    """A streamer that keeps the answer written so far in :attr:`text` (read from another
    thread; a handler polls it instead of blocking on a queue)."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.text, self.tokens, self.started = "", 0, time.perf_counter()

    def put(self, value):
        if not self.next_tokens_are_prompt:
            self.tokens += value.numel()
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False):
        self.text += text
