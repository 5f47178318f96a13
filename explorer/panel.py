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
    groups, overlay, timeline = decode_views(trace, session.image, layer, step)
    # The teaching tab shows the same two figures next to the explanation.
    return (viz.attention_heatmap(trace, layer), groups, overlay, timeline, viz.explain_html(trace, layer), groups,
            timeline, viz.layer_budgets_figure(trace, layer=layer))


def decode_views(trace, image, layer: int, step: int) -> tuple:
    """The figures that change while the answer is written: groups (with the entries removed
    so far), the image overlay and the cache over time."""
    return (viz.merge_groups(trace, layer, step), viz.image_overlay(trace, image, layer, step),
            viz.cache_timeline(trace, layer, step))


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


def live_panel(layer, head, request: gr.Request = None):
    """The panel of the answer being written (a timer's tick while it streams, API ``/live``).

    The first snapshot after the prefill draws every figure; later ones redraw only the
    decoding views (groups, image, cache over time) and move the step slider to the newest
    step. Nothing changes when there is no new snapshot. ``show_panel`` draws the final one.
    """
    session = session_of(request)
    live = session.live
    unchanged = (gr.update(),) * (len(PANEL) + 3)
    if live is None or live.trace is None or live.version == session.drawn:
        return unchanged
    first = session.drawn == 0
    session.drawn = live.version
    if session.live is live:  # not once the chat has left the final trace
        session.trace, session.image = live.trace, live.image  # so the sliders replay what ran so far
    trace, layer, step = _viewed(live.trace, layer, None, head)
    steps = gr.update(maximum=max(step, 1), value=step)
    if first:
        return (*render_panel(session, layer, step, head), gr.update(maximum=max(trace.num_layers - 1, 1),
                                                                     value=layer), steps, head_slider(live.trace))
    groups, overlay, timeline = decode_views(trace, live.image, layer, step)
    keep = gr.update()
    return keep, groups, overlay, timeline, keep, groups, timeline, keep, keep, steps, keep


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
