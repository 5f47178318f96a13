"""The cache over time: entries and KV bytes per decode step, against a full cache."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .style import (DROPPED_COLOUR, INK, METHOD_COLOURS, MODEBAR_ROOM, PAPER, SPAN_COLOURS, TEMPLATE, figure_title,
                    layer_label, method_name, resolve_step, title_height, token_text)


# Several methods on one chart: each its own dash and marker, so coinciding lines stay apart.
DASHES = ["dot", "dashdot", "longdash", "longdashdot", "dash"]
METHOD_DASHES = {"full": "dash", "elastic": "solid"}
SYMBOLS = ["circle", "square", "diamond", "triangle-up", "cross", "x", "star", "hexagon", "pentagon"]


def kv_unit(largest: float) -> tuple[str, int]:
    """The binary unit to show KV sizes up to ``largest`` bytes in: ``("KiB", 1024)`` ..."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if largest >= size:
            return unit, size
    return "B", 1


def cache_timeline(trace, layer: int = 0, step: int | None = None, height: int = 440) -> go.Figure:
    """Cache length and KV bytes after every forward, with N_tl and each eviction marked.

    Parameters
    ----------
    trace : elastic.Trace
    layer : int
        Layer whose length and evictions are drawn (layers differ in length when the
        method gives each its own budget: PrefixKV, VL-Cache).
    step : int or None
        Decode step to mark with a vertical line (None = the last one).
    height : int

    Returns
    -------
    plotly.graph_objects.Figure
        Top: ``cache length`` (``trace.lengths_of(layer)``), ``full cache``
        (``trace.full_lengths()``), ``layer budget`` (one marker at step 0, at
        ``trace.layers[layer].budget_entries``: what this layer's budget allows after the
        prefill; ``customdata`` = [its budget ratio]) and ``evictions`` (a rug of thin ticks
        on the plot's floor, ``y = 0``: one per row of ``trace.evictions_of(layer)`` up to
        ``step``, at its step, so that no marker hides the length line; ``customdata`` =
        evicted position, the hover gives the layer's length after it), plus a line at ``trace.fixed_point`` (N_tl)
        when the method has one and it holds for this layer. With one budget per layer,
        ``mean over layers`` (``trace.lengths``) too. Bottom: ``KV bytes`` and ``full KV
        bytes`` (all layers).
    """
    step = resolve_step(trace, step)
    steps = list(range(len(trace.lengths)))
    layer = min(max(int(layer), 0), trace.num_layers - 1)
    per_layer = trace.budgets_per_layer
    lengths = [int(v) for v in trace.lengths_of(layer)]
    full = [int(v) for v in trace.full_lengths()]
    lt = trace.layers[layer]
    shown = layer_label(trace, layer)  # the decoder index (hybrid models trace only some layers)
    ratio = float(trace.budget if lt.budget is None else lt.budget)
    allowed = lt.budget_entries if lt.budget_entries is not None else trace.budget_entries
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.68, 0.32], vertical_spacing=0.08)
    fig.add_trace(go.Scatter(name="full cache", x=steps, y=full, mode="lines",
                             line=dict(color="#7f7f7f", dash="dash")), row=1, col=1)
    if per_layer:
        fig.add_trace(go.Scatter(name="mean over layers", x=steps, y=[float(v) for v in trace.lengths], mode="lines",
                                 line=dict(color=INK, dash="dot", width=2),
                                 hovertemplate="step %{x}: %{y:.1f} entries, mean over layers<extra></extra>"),
                      row=1, col=1)
    fig.add_trace(go.Scatter(name="cache length", x=steps, y=lengths, mode="lines",
                             line=dict(color=SPAN_COLOURS["image"], width=3),
                             hovertemplate=f"step %{{x}}: layer {shown} holds %{{y}} entries<extra></extra>"),
                  row=1, col=1)
    if allowed is not None:
        own = (f"layer {shown}'s own budget {ratio:.3f}" if per_layer else f"the budget {trace.budget:g}")
        fig.add_trace(go.Scatter(
            name="layer budget", x=[0], y=[int(allowed)], customdata=[[ratio]], mode="markers",
            marker=dict(symbol="diamond", size=11, color="white", line=dict(color=INK, width=2)),
            hovertemplate=(f"after the prefill {own} allows &lceil;{ratio:.3f} &times; {trace.prompt_length}&rceil; = "
                           f"{int(allowed)} entries<extra></extra>"),
        ), row=1, col=1)
    rows = trace.evictions_of(layer)
    rows = rows[rows[:, 0] <= step]  # replaying step s: the evictions up to s
    # A rug of thin ticks on the floor of the plot: one per eviction, never over the length line.
    fig.add_trace(go.Scatter(
        name="evictions", x=[int(s) for s in rows[:, 0]], y=[0] * len(rows),
        customdata=[int(p) for p in rows[:, 1]],
        hovertext=[f"step {int(s)}: removed position {int(p)} '{token_text(trace, int(p))}'; "
                   f"layer {shown} then holds {lengths[int(s)]} entries" for s, p in rows],
        hovertemplate="%{hovertext}<extra></extra>", mode="markers", cliponaxis=False,
        marker=dict(symbol="line-ns", size=14, line=dict(color=DROPPED_COLOUR, width=2)),
    ), row=1, col=1)
    fixed_point = trace.fixed_point if lt.fixed_point is None else lt.fixed_point  # this layer's own N_tl
    if fixed_point is not None:
        # Slots below N_tl (the compressed prompt head) are never evicted while decoding.
        fig.add_hrect(y0=0, y1=fixed_point, fillcolor=SPAN_COLOURS["image"], opacity=0.08, line_width=0,
                      row=1, col=1)
        fig.add_hline(y=fixed_point, line=dict(color=DROPPED_COLOUR, dash="dot", width=2), row=1, col=1,
                      annotation=dict(text=f"N_tl = {fixed_point} (fixed eviction slot)", bgcolor=PAPER,
                                      font=dict(color=INK)),
                      annotation_position="bottom right", name="N_tl")

    kv = [int(v) for v in trace.kv_bytes()]
    full_kv = [int(v) * int(trace.bytes_per_entry) for v in full]
    unit, size = kv_unit(max(full_kv))  # one unit on the axis, the hover and the title
    fig.add_trace(go.Scatter(name="full KV bytes", x=steps, y=[v / size for v in full_kv], mode="lines",
                             showlegend=False, line=dict(color="#7f7f7f", dash="dash"),
                             hovertemplate=f"full: %{{y:,.1f}} {unit}<extra></extra>"), row=2, col=1)
    fig.add_trace(go.Scatter(name="KV bytes", x=steps, y=[v / size for v in kv], mode="lines", fill="tozeroy",
                             showlegend=False, line=dict(color=SPAN_COLOURS["image"]),
                             hovertemplate=f"kept: %{{y:,.1f}} {unit}<extra></extra>"), row=2, col=1)
    for row in (1, 2):
        fig.add_vline(x=step, line=dict(color=INK, width=1), row=row, col=1)

    share = kv[step] / full_kv[step] if full_kv[step] else 1.0
    sub = (f"{lengths[step]} entries{' (its own budget)' if per_layer else ''}; KV {kv[step] / size:,.1f} {unit} kept "
           f"vs {full_kv[step] / size:,.1f} {unit} full ({share:.0%}, all layers). Red ticks: evictions.")
    fig.update_layout(
        title=figure_title(f"Layer {shown}, step {step}: {method_name(trace.method)}", sub),
        height=height, margin=dict(l=70, r=MODEBAR_ROOM, t=title_height(sub), b=100),
        legend=dict(orientation="h", y=-0.22, yanchor="top", x=0),
        template=TEMPLATE,
    )
    fig.update_yaxes(title_text=f"entries in layer {shown}", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text=f"KV ({unit})", rangemode="tozero", nticks=4, row=2, col=1)
    fig.update_xaxes(title_text="decoding step (0 = after prefill)", row=2, col=1)
    return fig


def lengths_figure(traces: dict, height: int = 340) -> go.Figure:
    """Cache length per decoding step of several runs of the same prompt (one line each).

    Parameters
    ----------
    traces : dict
        ``method -> elastic.Trace`` (e.g. full, elastic, h2o on one question).

    Returns
    -------
    plotly.graph_objects.Figure
        One line per method, named by :func:`method_name`, with ``y = trace.lengths``
        (the mean over layers for a method with one budget per layer). Methods at one
        budget often keep exactly the same number of entries: every line has its own dash
        style and marker symbol (markers every few steps, shifted per method so they never
        sit on each other, ``marker.size`` 0 elsewhere); a line that is the same as an
        earlier one is drawn thin on top of the earlier one drawn wide, and the subtitle
        names it ("H2O = Elastic Cache").
    """
    fig = go.Figure()
    uneven = False
    drawn: list[tuple[str, list[float]]] = []
    same = []
    n = len(traces)
    for i, (method, trace) in enumerate(traces.items()):
        uneven |= trace.budgets_per_layer
        y = [float(v) for v in trace.lengths]
        twin = next((j for j, (other, ys) in enumerate(drawn) if ys == y), None)
        note = ""
        if twin is not None:
            # The line underneath grows wide and the one on top stays thin: both show.
            fig.data[twin].line.width = 7
            note = f" (same as {method_name(drawn[twin][0])})"
            same.append(f"{method_name(method)} = {method_name(drawn[twin][0])}")
        drawn.append((method, y))
        every = max(1, len(y) // 6)
        shift = (i * every) // max(n, 1)
        sizes = [11 if (s - shift) % every == 0 and s >= shift else 0 for s in range(len(y))]
        mean = " (mean over layers: each has its own budget)" if trace.budgets_per_layer else " per layer"
        fig.add_trace(go.Scatter(
            name=method_name(method), x=list(range(len(y))), y=y, mode="lines+markers",
            line=dict(color=METHOD_COLOURS.get(method), width=2.5 if twin is not None else 3.5,
                      dash=METHOD_DASHES.get(method, DASHES[i % len(DASHES)])),
            marker=dict(symbol=SYMBOLS[i % len(SYMBOLS)], size=sizes, color=METHOD_COLOURS.get(method),
                        line=dict(color=PAPER, width=1)),
            hovertemplate=f"{method_name(method)}, step %{{x}}: %{{y:.4~g}} entries{mean}{note}<extra></extra>",
        ))
    sub = "mean over layers where budgets differ" if uneven else "entries in every layer"
    if same:
        sub += "; the same lines: " + ", ".join(same) + " (drawn thin on top)"
    top, bottom = title_height(sub), 100
    plot_px = max(height - top - bottom, 60)
    fig.update_layout(
        title=figure_title("KV entries per layer while decoding", sub), height=height,
        xaxis_title="decoding step (0 = after prefill)", yaxis_title="entries per layer", yaxis_rangemode="tozero",
        margin=dict(l=70, r=MODEBAR_ROOM, t=top, b=bottom),
        legend=dict(orientation="h", y=-62 / plot_px, yanchor="top", x=0), template=TEMPLATE,
    )
    return fig
