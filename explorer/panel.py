"""The Explore tab's right panel: the figures and teaching text of one trace (from ``viz``).

``PANEL`` names the panel's outputs in the order every handler here returns them; the
Explore tab lists its components in the same order (``ExploreTab.panel``).
"""

from __future__ import annotations

import gradio as gr

import viz

from .guards import index
from .sessions import Session, session_of

# The heatmap, groups, image overlay, timeline, explanation, the teaching tab's copies of the
# groups and the timeline, and the budget per layer.
PANEL = ("heatmap", "groups", "overlay", "timeline", "explain", "teach_groups", "teach_timeline", "budgets")
# The views fixed once the prompt is read; the others change with every decoding step.
PREFILL_VIEWS = ("heatmap", "explain", "budgets")
# The figure tab the page shows (``ExploreTab.shown``) and the views it holds: while an answer
# streams, /live draws only those (each is 5-15 ms of plotly in Python, taken from the thread
# that writes the answer), a prefill view once. "all" (an API client's default) draws every one.
SHOWN_VIEWS = {"all": PANEL, "attention": ("heatmap",), "groups": ("groups",), "image": ("overlay",),
               "timeline": ("timeline", "budgets"), "how": ("explain", "teach_groups", "teach_timeline")}
FIGURE_TABS = ("attention", "groups", "image", "timeline", "how")  # ExploreTab.figure_tabs, in order
WAITING = "Send a message (or pick an example) to see the cache."


def _viewed(trace, layer, step, head):
    """``trace`` (or its KV ``head``'s, for a policy that selects per head), with ``layer``
    and ``step`` as valid indices into it."""
    if trace.per_head:
        trace = trace.of_head(min(max(index(head), 0), len(trace.heads) - 1))
    layer = min(max(index(layer), 0), trace.num_layers - 1)
    return trace, layer, viz.resolve_step(trace, index(step) if step is not None else None)


def render_panel(session: Session, layer, step, head=0) -> tuple:
    """Figures and teaching text for the session's last trace at ``layer`` / ``step`` (and
    KV ``head``, for a policy that selects per head), in ``PANEL`` order (``layer`` outlined
    in the budget per layer)."""
    if session.trace is None:
        empty = viz.message_figure(WAITING)
        return empty, empty, empty, empty, viz.explain_html(None), empty, empty, empty
    trace, layer, step = _viewed(session.trace, layer, step, head)
    views = draw_views(PANEL, trace, session.image, layer, step)
    return tuple(views[name] for name in PANEL)


def draw_views(names, trace, image, layer: int, step: int) -> dict:
    """The panel's views ``names`` (``PANEL`` names) of ``trace`` at ``layer`` / ``step``."""
    draw = {"heatmap": lambda: viz.attention_heatmap(trace, layer),
            "groups": lambda: viz.merge_groups(trace, layer, step),
            "overlay": lambda: viz.image_overlay(trace, image, layer, step),
            "timeline": lambda: viz.cache_timeline(trace, layer, step),
            "explain": lambda: viz.explain_html(trace, layer),
            "budgets": lambda: viz.layer_budgets_figure(trace, layer=layer)}
    made, views = {}, {}
    for name in names:
        drawn = name.removeprefix("teach_")  # the teaching tab shows the same two figures
        if drawn not in made:
            made[drawn] = draw[drawn]()
        views[name] = made[drawn]
    return views


def head_slider(trace):
    """The KV-head selector: shown only for a trace whose heads kept different entries."""
    if trace is None or not trace.per_head:
        return gr.update(visible=False, value=0)
    return gr.update(visible=True, maximum=len(trace.heads) - 1, value=0)


def on_slider(layer, step, head, request: gr.Request):
    session = session_of(request)
    heat, *rest = render_panel(session, layer, step, head)
    return (heat if session.trace is not None else gr.update(), *rest)  # the heatmap frames the chosen layer


def show_panel(layer, request: gr.Request = None):
    """The side panel for the session's last answer (chained after ``chat``, API ``/panel``):
    the figures at ``layer`` and the last step, with the sliders' ranges; the placeholder
    when there is no answer yet."""
    session = session_of(request)
    if session.trace is None:
        reset = gr.update(maximum=1, value=0)
        return *render_panel(session, 0, 0), reset, reset, head_slider(None)
    steps, layers = session.trace.decode_steps, session.trace.num_layers
    layer = min(max(index(layer), 0), layers - 1)
    return (*render_panel(session, layer, steps), gr.update(maximum=max(layers - 1, 1), value=layer),
            gr.update(maximum=max(steps, 1), value=steps), head_slider(session.trace))


def live_panel(layer, head, shown="all", request: gr.Request = None):
    """The panel of the answer being written (a timer's tick while it streams, API ``/live``).

    Draws the views of the ``shown`` figure tab (``SHOWN_VIEWS``; every view for "all"): on
    each new snapshot its decoding views (groups, image, cache over time, at the newest step),
    and a prefill view (heatmap, budgets, explanation) once per answer; moves the step slider
    to the newest step (on the Attention tab only that). Nothing changes when there is no
    new snapshot and no prefill view left to draw. ``show_panel`` draws the final panel,
    every view.
    """
    session = session_of(request)
    live = session.live
    unchanged = (gr.update(),) * (len(PANEL) + 3)
    if live is None or live.trace is None:
        return unchanged
    shown_views = SHOWN_VIEWS.get(shown, ())
    new = [name for name in shown_views if name in PREFILL_VIEWS and name not in session.prefill_drawn]
    snapshot = live.version != session.drawn
    if snapshot:
        new += [name for name in shown_views if name not in PREFILL_VIEWS]
    if not new and not snapshot:
        return unchanged
    first = session.drawn == 0
    session.drawn = live.version
    session.prefill_drawn.update(name for name in new if name in PREFILL_VIEWS)
    if session.live is live:  # not once the chat has left the final trace
        session.trace, session.image = live.trace, live.image  # so the sliders replay what ran so far
    trace, layer, step = _viewed(live.trace, layer, None, head)
    views = draw_views(new, trace, live.image, layer, step)
    figures = tuple(views.get(name, gr.update()) for name in PANEL)
    steps = gr.update(maximum=max(step, 1), value=step) if snapshot else gr.update()
    if first:
        return *figures, gr.update(maximum=max(trace.num_layers - 1, 1), value=layer), steps, head_slider(live.trace)
    return *figures, gr.update(), steps, gr.update()


def pending_panel():
    """The panel's placeholder from sending until the first snapshot of the new answer
    (not queued: shown at once; the explanation stays)."""
    pending = viz.message_figure("The figures appear as soon as the model has read the prompt.")
    return pending, pending, pending, pending, gr.update(), pending, pending, pending


def empty_panel(session: Session) -> tuple:
    """The placeholder panel and reset sliders (no stale layer / step ranges)."""
    reset = gr.update(maximum=1, value=0)
    return *render_panel(session, 0, 0), reset, reset, head_slider(None)


def explain_placeholder() -> str:
    return viz.explain_html(None)
