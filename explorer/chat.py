"""The chat: check the message, stream the answer, leave its trace in the session.

``chat`` streams the chat, the message box and the status only; the panel follows from
its own events (``panel.py``). Bad input leaves the chat untouched and says why.
"""

from __future__ import annotations

import statistics

import gradio as gr

import elastic
import viz

from . import limits, runner
from .guards import checked_text, served_image, without_folder
from .history import EMPTY, blocks, conversation
from .limits import problem
from .panel import empty_panel
from .live import LiveStreamer
from .runner import Background
from .sessions import MODEL, session_of


def small(image):
    """A display-sized copy: all the overlay needs (sessions may pile up)."""
    image = image.copy()
    image.thumbnail((2 * viz.image.MAX_SIDE, 2 * viz.image.MAX_SIDE))
    return image


def chat(message, history, method, budget, start_size, distance, max_new_tokens, layer,
         importance="sum", scope="layer", prefill="merge", decode="fixed-point", protect="none",
         request: gr.Request = None):
    """Stream an answer into the chat; the panel's events draw its trace from the session.

    The chat text, the message box and the status are this event's only outputs: gradio
    rebuilds a component for every ``gr.update()`` output of every streamed message (about
    2 ms each, holding the GIL the model needs), so the figures are not among them
    (docs/benchmarks.md).

    ``importance`` ... ``protect`` are Elastic's ablation options (other methods ignore them).
    """
    history = list(history or [])
    message = message if isinstance(message, dict) else {}

    def refuse(text):
        return history, gr.update(), problem(text)

    try:
        question = checked_text(str(message.get("text") or ""))
        files = [f if isinstance(f, str) else f.get("path") for f in message.get("files") or []]
        history_files = [f for turn in history for f in blocks(turn)[1]]
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
        image = elastic.load_image(new_image, side=MODEL.image_side()) if new_image else None
    except ValueError as error:
        yield refuse(without_folder(error, new_image or ""))
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
            image = elastic.load_image(image_path, side=MODEL.image_side())
        except ValueError as error:
            yield refuse(f"The conversation's image can no longer be read ({without_folder(error, image_path)}); "
                         "upload it again.")
            return

    user_turn = {"role": "user", "content": ([{"path": new_image}] if new_image else []) + [question]}
    shown = history + [user_turn, {"role": "assistant", "content": ""}]
    note = " New image: the model's context restarts from this message." if new_image and history else ""
    yield shown, gr.update(value=None), f"Generating with {viz.method_name(method)}…{note}"

    try:
        model, processor = MODEL.get()
    except elastic.ModelLoadError as error:
        yield history, gr.update(value=message), problem(str(error))
        return
    session = session_of(request)
    session.stop.clear()  # a Stop pressed before this answer started does not end it
    streamer = LiveStreamer(getattr(processor, "tokenizer", processor), every=limits.LIVE_SECONDS / 2)
    streamer.image = image and small(image)
    session.live, session.drawn = streamer, 0  # the panel's timer draws its snapshots
    session.prefill_drawn = set()
    options = dict(importance=importance or "sum", scope=scope or "layer", prefill=prefill or "merge",
                   decode=decode or "fixed-point", protect=protect or "none")
    run = Background(lambda: elastic.generate(
        model, processor, image, messages, method=method, budget=float(budget), start_size=int(start_size),
        distance=int(distance), max_new_tokens=int(max_new_tokens), streamer=streamer, stop=session.stop,
        **options), session.stop)
    generating = f"Generating with {viz.method_name(method)}… (Stop ends it){note}"
    try:
        # The chat text only, and at most STREAM_HZ times a second: every update costs a
        # round trip to the browser, which would otherwise slow the model down.
        for _ in run.ticks(1 / limits.STREAM_HZ):
            if streamer.text != shown[-1]["content"]:
                shown[-1] = {"role": "assistant", "content": streamer.text}
                yield shown, gr.update(), generating
    finally:
        run.close()  # when the client went away: the model stops after the current token
        if session.live is streamer:
            session.live = None  # from here show_panel draws the answer's final trace
    try:
        gen = run.result()
    except Exception as error:  # reported in the UI; the server keeps serving
        yield history, gr.update(value=message), problem(f"No answer: {limits.failure(error)}")
        return

    runner.DURATIONS.append(gen.stats["total_s"])
    session.trace, session.image, session.stats = gen.trace, streamer.image, gen.stats
    if run.timed_out:
        gen.warnings.append(f"Stopped at the time limit of {limits.MAX_SECONDS:g} s per request.")
    for w in gen.warnings:
        gr.Warning(w)
    shown[-1] = {"role": "assistant", "content": gen.text or EMPTY}
    yield shown, gr.update(), viz.summary_markdown(gen.trace, gen.stats, gen.warnings)


def waiting_status(message) -> str:
    """The status while a question waits for the model (not queued: shown at once), with
    how long recent answers took, measured here (gradio's own estimate shows the place)."""
    text = (message.get("text") or "").strip() if isinstance(message, dict) else ""
    if not text:
        return ""
    short = text if len(text) <= 80 else text[:80] + "…"
    busy = len(runner.GENERATING)
    typical = f"; answers here take about {statistics.median(runner.DURATIONS):.0f} s" if runner.DURATIONS else ""
    ahead = f" ({busy} running now{typical})" if busy else ""
    return f"⏳ Sent “{short}”; waiting for the model{ahead}."


def clear_chat(request: gr.Request):
    session = session_of(request)
    session.trace = session.image = session.stats = None
    return [], None, "", *empty_panel(session)
