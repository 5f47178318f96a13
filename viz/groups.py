"""Anchors and merge groups of one layer: every position coloured by the entry holding it."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from .state import ANCHOR, EVICTED, MERGED, PROTECTED, prompt_state
from .style import (
    ANCHOR_COLOUR, DROPPED_COLOUR, EVICTED_COLOUR, GROUP_COLOURS, PROTECTED_COLOUR, SPAN_COLOURS,
    TEMPLATE, add_span_band, method_name, resolve_step, token_text,
)


DROPPED_FILL = "#f5c6c2"


def group_colours(trace, layer: int) -> dict[int, str]:
    """Colour of each kept entry of ``layer``, cycling in position order so neighbours differ."""
    kept = trace.layers[layer].kept
    return {int(p): GROUP_COLOURS[i % len(GROUP_COLOURS)] for i, p in enumerate(kept)}


def merge_groups(trace, layer: int = 0, step: int | None = None, height: int = 300) -> go.Figure:
    """One bar per position: prompt positions coloured by their anchor, the cache at ``step``.

    Parameters
    ----------
    trace : elastic.Trace
    layer : int
        Decoder layer to show.
    step : int or None
        Decode step to replay (0 = right after the prefill; None = the last step).
    height : int

    Returns
    -------
    plotly.graph_objects.Figure
        Traces: ``prompt`` (a bar per prompt position, ``customdata`` = [position, holding
        entry, step removed or -1]), ``anchors`` (kept, unprotected positions; ``kept`` for
        methods that do not merge), ``protected``, ``evicted at prefill``, ``removed while
        decoding`` (positions whose entry is gone by ``step``), ``generated (held)`` and
        ``generated (removed)`` (decoded tokens up to ``step``).
    """
    step = resolve_step(trace, step)
    state = prompt_state(trace, layer, step)
    T = trace.prompt_length
    colours = group_colours(trace, layer)
    sizes = trace.layers[layer].group_sizes()

    bar_colours, hover = [], []
    for p in range(T):
        g, status = int(state.group[p]), state.status[p]
        # Gone from the cache: pale red, so a replay shows what the window has eaten.
        bar_colours.append(EVICTED_COLOUR if g < 0 else DROPPED_FILL if state.dropped[p] else colours[g])
        line = f"position {p} '{token_text(trace, p)}' ({trace.token_type(p)})<br>"
        if status == EVICTED:
            line += "evicted at the prefill"
        elif status == MERGED:
            line += f"merged into anchor {g} '{token_text(trace, g)}'"
        else:
            line += f"{status}, holds {sizes.get(p, 1)} position(s)"
        if state.dropped[p]:
            line += f"<br>removed while decoding at step {state.dropped_at[p]}"
        hover.append(line)

    fig = go.Figure()
    fig.add_trace(go.Bar(
        name="prompt", x=list(range(T)), y=[1.0] * T, width=1.0,
        marker=dict(color=bar_colours, line=dict(width=0)),
        customdata=[[p, int(state.group[p]), int(state.dropped_at[p])] for p in range(T)],
        hovertext=hover, hovertemplate="%{hovertext}<extra></extra>", showlegend=False,
    ))

    def markers(name, xs, y, symbol, colour, size, line_colour="black", hovertemplate=None):
        fig.add_trace(go.Scatter(
            name=name, x=[int(x) for x in xs], y=[y] * len(xs), mode="markers",
            marker=dict(symbol=symbol, color=colour, size=size, line=dict(color=line_colour, width=1)),
            hovertemplate=hovertemplate or f"{name}: position %{{x}}<extra></extra>",
        ))

    anchor_name = "anchors" if trace.method == "elastic" else "kept"
    markers(anchor_name, state.anchors, 1.12, "triangle-down", ANCHOR_COLOUR, 7, ANCHOR_COLOUR)
    markers("protected", [p for p, s in enumerate(state.status) if s == PROTECTED], 1.15, "star",
            PROTECTED_COLOUR, 11)
    markers("evicted at prefill", [p for p, s in enumerate(state.status) if s == EVICTED], 0.5, "line-ns",
            "#7f7f7f", 6, "#7f7f7f")
    markers("removed while decoding", np.flatnonzero(state.dropped), 0.5, "x-thin", DROPPED_COLOUR, 9,
            DROPPED_COLOUR)

    # Decoded tokens so far: the sliding window behind the compressed prompt.
    fed = np.arange(T, T + step)
    held = set(trace.positions_at(layer, step).tolist())
    kept_fed = [int(p) for p in fed if int(p) in held]
    gone_fed = [int(p) for p in fed if int(p) not in held]
    for name, xs, colour in (("generated (held)", kept_fed, SPAN_COLOURS["generated"]),
                             ("generated (removed)", gone_fed, EVICTED_COLOUR)):
        fig.add_trace(go.Bar(
            name=name, x=xs, y=[1.0] * len(xs), width=1.0, marker=dict(color=colour, line=dict(width=0)),
            hovertext=[f"position {p} '{token_text(trace, p)}' (generated)" for p in xs],
            hovertemplate="%{hovertext}<extra>" + name + "</extra>",
        ))

    add_span_band(fig, trace, y0=-0.32, y1=-0.08, yref="y")
    n_held = len(held)
    fig.update_layout(
        title=dict(
            text=f"Layer {layer}, step {step}: {method_name(trace.method)} holds {n_held} entries "
                 f"for {T + step} tokens",
            font=dict(size=14),
        ),
        height=height, barmode="overlay", bargap=0,
        margin=dict(l=30, r=20, t=50, b=90),
        xaxis=dict(title="original position", range=[-0.5, max(T + step, T) - 0.5], showgrid=False),
        yaxis=dict(visible=False, range=[-0.4, 1.25]),
        legend=dict(orientation="h", y=-0.3, yanchor="top", x=0),
        template=TEMPLATE,
    )
    return fig
