"""Anchors and merge groups of one layer: every position coloured by the entry holding it."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from .state import ANCHOR, EVICTED, MERGED, PROTECTED, prompt_state
from .style import (
    ANCHOR_COLOUR, DROPPED_COLOUR, EVICTED_COLOUR, INK, MODEBAR_ROOM, PROTECTED_COLOUR, SPAN_COLOURS, TEMPLATE,
    figure_title, layer_label, method_name, resolve_step, span_band, title_height, token_text,
)


DROPPED_FILL = "#f5c6c2"
# Merge groups as alternating bands: three tones in turn, so neighbouring groups always
# differ and a group reads as one block of colour (a rainbow of 60 groups reads as noise).
GROUP_TONES = ["#1d4e89", "#5b9bd5", "#b7d7f0"]


def group_colours(trace, layer: int) -> dict[int, str]:
    """Colour of each kept entry of ``layer``: the three tones in turn, in position order,
    where entries hold merged tokens; the darkest tone for all where nothing was merged
    (one-position bands in a light tone would look like the grey of evicted ones)."""
    lt = trace.layers[layer]
    kept = lt.kept
    tones = GROUP_TONES if len(lt.merged) else GROUP_TONES[:1]
    return {int(p): tones[i % len(tones)] for i, p in enumerate(kept)}


def merge_groups(trace, layer: int = 0, step: int | None = None, height: int = 340) -> go.Figure:
    """One bar per position: prompt positions coloured by their anchor, the cache at ``step``.

    Parameters
    ----------
    trace : elastic.Trace
    layer : int
        Index into ``trace.layers`` of the layer to show.
    step : int or None
        Decode step to replay (0 = right after the prefill; None = the last step).
    height : int

    Returns
    -------
    plotly.graph_objects.Figure
        Traces: ``prompt`` (a bar per prompt position in its group's tone: the kept
        entries take three tones in turn, :data:`GROUP_TONES`, and every position the tone
        of the entry holding it; ``customdata`` = [position, holding entry, step removed or
        -1]), ``groups`` (the legend entry saying one colour band = one merge group),
        ``anchors`` (thin ticks above the kept, unprotected positions; ``kept`` for
        methods that do not merge), ``protected``, ``evicted at prefill`` and ``removed
        while decoding`` (bars over the positions whose entry is gone by ``step``),
        ``generated (held)`` and ``generated (removed)`` (decoded tokens up to ``step``).
    """
    step = resolve_step(trace, step)
    state = prompt_state(trace, layer, step)
    T = trace.prompt_length
    colours = group_colours(trace, layer)
    sizes = trace.layers[layer].group_sizes()
    merges = len(trace.layers[layer].merged) > 0

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

    # Built as plain data and handed to plotly once (add_trace and update_layout validate on
    # every call: this figure is redrawn live while an answer streams).
    data = [dict(
        type="bar", name="prompt", x=list(range(T)), y=[1.0] * T, width=1.0,
        marker=dict(color=bar_colours, line=dict(width=0)),
        customdata=[[p, int(state.group[p]), int(state.dropped_at[p])] for p in range(T)],
        hovertext=hover, hovertemplate="%{hovertext}<extra></extra>", showlegend=False,
    )]
    # The legend's word for the bands (one entry standing for the three tones).
    data.append(dict(
        type="bar", name="one colour band = one merge group" if merges else "kept entry",
        x=[None], y=[None], marker=dict(color=GROUP_TONES[1] if merges else GROUP_TONES[0]), legendgroup="groups",
        hoverinfo="skip",
    ))

    def overlay(name, xs, colour, pattern=None):
        xs = [int(x) for x in xs]
        data.append(dict(
            type="bar", name=name, x=xs, y=[1.0] * len(xs), width=1.0,
            marker=dict(color=colour, line=dict(width=0), pattern=pattern or {}),
            hovertext=[hover[p] for p in xs], hovertemplate="%{hovertext}<extra></extra>",
        ))

    overlay("evicted at prefill", [p for p, s in enumerate(state.status) if s == EVICTED], EVICTED_COLOUR)
    overlay("removed while decoding", np.flatnonzero(state.dropped), DROPPED_FILL,
            dict(shape="x", fgcolor=DROPPED_COLOUR, size=8, solidity=0.15))

    # Kept positions as thin ticks above the bars: neighbours stay apart even in a run of anchors.
    anchor_name = "anchors" if trace.method == "elastic" else "kept"
    data.append(dict(
        type="scatter", name=anchor_name, x=[int(x) for x in state.anchors], y=[1.13] * len(state.anchors),
        mode="markers", marker=dict(symbol="line-ns", size=16, line=dict(color=ANCHOR_COLOUR, width=2)),
        hovertemplate=f"{anchor_name[:-1]}: position %{{x}}<extra></extra>",
    ))
    prot = [p for p, s in enumerate(state.status) if s == PROTECTED]
    data.append(dict(
        type="scatter", name="protected", x=prot, y=[1.13] * len(prot), mode="markers",
        marker=dict(symbol="star", size=13, color=PROTECTED_COLOUR, line=dict(color=INK, width=1)), cliponaxis=False,
        hovertemplate="protected (never merged): position %{x}<extra></extra>",
    ))

    # Decoded tokens so far: the sliding window behind the compressed prompt.
    fed = np.arange(T, T + step)
    held = set(trace.positions_at(layer, step).tolist())
    kept_fed = [int(p) for p in fed if int(p) in held]
    gone_fed = [int(p) for p in fed if int(p) not in held]
    for name, xs, colour in (("generated (held)", kept_fed, SPAN_COLOURS["generated"]),
                             ("generated (removed)", gone_fed, EVICTED_COLOUR)):
        data.append(dict(
            type="bar", name=name, x=xs, y=[1.0] * len(xs), width=1.0, marker=dict(color=colour, line=dict(width=0)),
            hovertext=[f"position {p} '{token_text(trace, p)}' (generated)" for p in xs],
            hovertemplate="%{hovertext}<extra>" + name + "</extra>",
        ))

    shapes, annotations = span_band(trace, y0=-0.34, y1=-0.08, yref="y")
    n_held = len(held)
    sub = (f"{n_held} entries for {T + step} tokens. "
           + ("One colour band = one merge group: an anchor (tick) and the tokens merged into it."
              if merges else "Blue: kept at the prefill; grey: evicted at the prefill."))
    top, bottom = title_height(sub), 112
    fig = go.Figure(data=data, layout=dict(
        title=figure_title(f"Layer {layer_label(trace, layer)}, step {step}: {method_name(trace.method)}", sub),
        height=height, barmode="overlay", bargap=0,
        margin=dict(l=20, r=MODEBAR_ROOM, t=top, b=bottom),
        xaxis=dict(title="original position", range=[-0.5, max(T + step, T) - 0.5], showgrid=False),
        yaxis=dict(visible=False, range=[-0.38, 1.25]),
        legend=dict(orientation="h", y=-0.36, yanchor="top", x=0),
        template=TEMPLATE, shapes=shapes, annotations=annotations,
    ))
    return fig
