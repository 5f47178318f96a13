"""The page: the intro, the Explore and Compare tabs, their events, and ``serve``."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from . import limits
from .chat import chat, clear_chat, waiting_status
from .compare import compare, compare_from_chat, compare_started
from .compare_tab import build_compare_tab
from .defaults import BENCHMARKS, DEFAULT_BUDGET, DEFAULT_METHOD, EXAMPLES_DIR, load_examples
from .explore_tab import build_explore_tab
from .guards import RequestTooLarge, bound_only_model_events, explain_bad_inputs
from .panel import FIGURE_TABS, live_panel, on_slider, pending_panel, show_panel
from .sessions import forget_session, stop_generation

CSS = (Path(__file__).parent / "style.css").read_text()
INTRO = """**Elastic Cache Explorer**: watch a KV cache compressed by [Elastic Cache](https://arxiv.org/abs/2407.18121) \
(tokens merged into *anchors*) as a vision-language model answers. Model: SmolLM2 with eyes, for **synthetic shape \
scenes** only."""
# A plot drawn while its tab was hidden has no width to fit; a resize on showing the tab
# makes plotly fit it to the visible column again.
RESIZE_JS = "() => { setTimeout(() => window.dispatchEvent(new Event('resize')), 50); }"


def build(examples_dir: Path = EXAMPLES_DIR, gpu=lambda fn: fn) -> gr.Blocks:
    """The whole app (``examples_dir`` holds ``examples.json`` and its images); ``gpu`` wraps
    the handlers that run the model (``spaces.GPU`` on a ZeroGPU Space)."""
    examples = load_examples(examples_dir)
    with gr.Blocks(title="Elastic Cache Explorer", fill_width=True) as blocks:
        gr.Markdown(INTRO, elem_id="intro")
        with gr.Tabs() as tabs:
            explore = build_explore_tab(examples)
            comp = build_compare_tab(examples)
        # Ticks while an answer streams: the live panel (activated on send, stopped after the answer).
        timer = gr.Timer(limits.LIVE_SECONDS, active=False)
        wire_explore(explore, comp, tabs, timer, gpu, examples)
        wire_compare(comp, gpu)
        for tab in (explore.tab, comp.tab, *explore.figure_tabs):
            tab.select(None, None, None, js=RESIZE_JS, api_name=False, queue=False)
        # The page tells /live which figure tab it shows (in the browser: no request of its own).
        for tab, name in zip(explore.figure_tabs, FIGURE_TABS):
            tab.select(None, None, explore.shown, js=f"() => {name!r}", api_name=False, queue=False)
        blocks.load(None, None, explore.shown, js="() => 'attention'", api_name=False, queue=False)
        blocks.unload(forget_session)
    return blocks


def wire_explore(e, comp, tabs, timer, gpu, examples) -> None:
    """The chat, its live and final panel, the sliders, Stop, Clear and "Compare methods on
    this question"."""
    sliders = e.sliders
    if e.examples is not None:
        def pick(selected: gr.SelectData):
            """A thumbnail puts its scene and question into the message box, and sets the
            method and budget its caption speaks of."""
            chosen = examples[selected.index]
            return ({"text": chosen["prompt"], "files": [chosen["image"]]}, DEFAULT_METHOD,
                    chosen.get("budget", DEFAULT_BUDGET))

        e.examples.select(pick, None, [e.msg, e.method, e.budget], queue=False, api_name=False,
                          show_progress="hidden")
    send = [e.msg.submit, e.send.click]
    gr.on(send, waiting_status, [e.msg], [e.status], queue=False, api_name=False, show_progress="hidden")
    gr.on(send, start_live, None, [*e.panel, timer], queue=False, api_name=False, show_progress="hidden")
    # The panel is not among the chat's outputs (see chat() for why): while the answer
    # streams, the timer's ticks draw the live panel; after it, /panel draws the final one.
    # Like every event that does not wait for the model, a full queue does not refuse them.
    gr.on(send, gpu(chat), [e.msg, e.chatbot, *e.settings], [e.chatbot, e.msg, e.status],
          api_name="chat", concurrency_id="model", concurrency_limit=limits.CONCURRENCY
          ).then(show_panel, [e.layer], [*e.panel, *sliders], api_name="panel", show_progress="hidden", queue=False
                 ).then(lambda: gr.Timer(active=False), None, timer, api_name=False, queue=False)
    timer.tick(live_panel, [e.layer, e.head, e.shown], [*e.panel, *sliders], api_name="live", queue=False,
               show_progress="hidden")
    # Not queued: it must get through while the chat holds the model's queue slot.
    e.stop.click(stop_generation, None, None, api_name="stop", queue=False)
    for slider in sliders:  # a person's moves only (the live panel moves the step slider too)
        slider.input(on_slider, sliders, e.panel, api_name=False, show_progress="hidden",
                     trigger_mode="always_last")
    for clearing in (e.clear.click, e.chatbot.clear):
        clearing(clear_chat, None, [e.chatbot, e.msg, e.status, *e.panel, *sliders], api_name=False)
    e.to_compare.click(compare_from_chat, [e.chatbot, e.msg, e.method, e.budget, e.max_new],
                       [*comp.inputs, tabs], api_name=False)


def wire_compare(c, gpu) -> None:
    c.stop.click(stop_generation, None, None, api_name=False, queue=False)
    # A new run clears the old results at once, even while it waits for the model.
    c.run.click(compare_started, [c.image, c.question, c.budget, c.use_context, c.context], c.outputs, queue=False,
                api_name=False, show_progress="hidden")
    c.run.click(gpu(compare), c.inputs, c.outputs, show_progress_on=[c.html],  # one progress bar
                api_name="compare", concurrency_id="model", concurrency_limit=limits.CONCURRENCY)


def start_live():
    """On send: the panel's placeholder at once, and the live panel's timer on."""
    return *pending_panel(), gr.Timer(active=True)


def serve(blocks: gr.Blocks, **launch):
    """Queue and launch ``blocks`` within the server's bounds; ``launch`` adds or overrides
    ``Blocks.launch`` arguments (host, port; tests: ``prevent_thread_lock``)."""
    from starlette.middleware import Middleware

    blocks.queue(default_concurrency_limit=1, max_size=limits.QUEUE_SIZE)
    bound_only_model_events(blocks)
    explain_bad_inputs(blocks)
    options = dict(css=CSS, theme=gr.themes.Soft(), max_file_size="20mb", allowed_paths=[str(EXAMPLES_DIR), str(BENCHMARKS)],
                   state_session_capacity=limits.MAX_SESSIONS, app_kwargs={"middleware": [Middleware(RequestTooLarge)]})
    return blocks.launch(**{**options, **launch})
