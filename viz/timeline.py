"""The cache over time: entries and KV bytes per decode step, against a full cache."""

from __future__ import annotations

import plotly.graph_objects as go

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
    # Built as plain data and handed to plotly once: make_subplots, add_vline and
    # update_layout validate on every call (35 ms per figure, redrawn live while an answer
    # streams); this is the same figure in a fifth of the time.
    top, bottom = "x", "x2"  # the two rows share the step axis (x matches x2)
    data = [dict(type="scatter", name="full cache", x=steps, y=full, mode="lines",
                 line=dict(color="#7f7f7f", dash="dash"), xaxis=top, yaxis="y")]
    if per_layer:
        data.append(dict(type="scatter", name="mean over layers", x=steps, y=[float(v) for v in trace.lengths],
                         mode="lines", line=dict(color=INK, dash="dot", width=2), xaxis=top, yaxis="y",
                         hovertemplate="step %{x}: %{y:.1f} entries, mean over layers<extra></extra>"))
    data.append(dict(type="scatter", name="cache length", x=steps, y=lengths, mode="lines",
                     line=dict(color=SPAN_COLOURS["image"], width=3), xaxis=top, yaxis="y",
                     hovertemplate=f"step %{{x}}: layer {shown} holds %{{y}} entries<extra></extra>"))
    if allowed is not None:
        own = (f"layer {shown}'s own budget {ratio:.3f}" if per_layer else f"the budget {trace.budget:g}")
        data.append(dict(
            type="scatter", name="layer budget", x=[0], y=[int(allowed)], customdata=[[ratio]], mode="markers",
            marker=dict(symbol="diamond", size=11, color="white", line=dict(color=INK, width=2)),
            hovertemplate=(f"after the prefill {own} allows &lceil;{ratio:.3f} &times; {trace.prompt_length}&rceil; = "
                           f"{int(allowed)} entries<extra></extra>"), xaxis=top, yaxis="y"))
    rows = trace.evictions_of(layer)
    rows = rows[rows[:, 0] <= step]  # replaying step s: the evictions up to s
    # A rug of thin ticks on the floor of the plot: one per eviction, never over the length line.
    data.append(dict(
        type="scatter", name="evictions", x=[int(s) for s in rows[:, 0]], y=[0] * len(rows),
        customdata=[int(p) for p in rows[:, 1]],
        hovertext=[f"step {int(s)}: removed position {int(p)} '{token_text(trace, int(p))}'; "
                   f"layer {shown} then holds {lengths[int(s)]} entries" for s, p in rows],
        hovertemplate="%{hovertext}<extra></extra>", mode="markers", cliponaxis=False,
        marker=dict(symbol="line-ns", size=14, line=dict(color=DROPPED_COLOUR, width=2)), xaxis=top, yaxis="y"))
    shapes, annotations = [], []
    fixed_point = trace.fixed_point if lt.fixed_point is None else lt.fixed_point  # this layer's own N_tl
    if fixed_point is not None:
        # Slots below N_tl (the compressed prompt head) are never evicted while decoding.
        shapes.append(dict(type="rect", xref="x domain", x0=0, x1=1, yref="y", y0=0, y1=fixed_point,
                           fillcolor=SPAN_COLOURS["image"], opacity=0.08, line=dict(width=0)))
        shapes.append(dict(type="line", name="N_tl", xref="x domain", x0=0, x1=1, yref="y", y0=fixed_point,
                           y1=fixed_point, line=dict(color=DROPPED_COLOUR, dash="dot", width=2)))
        annotations.append(dict(text=f"N_tl = {fixed_point} (fixed eviction slot)", bgcolor=PAPER,
                                font=dict(color=INK), showarrow=False, xref="x domain", x=1, xanchor="right",
                                yref="y", y=fixed_point, yanchor="top"))

    kv = [int(v) for v in trace.kv_bytes()]
    full_kv = [int(v) * int(trace.bytes_per_entry) for v in full]
    unit, size = kv_unit(max(full_kv))  # one unit on the axis, the hover and the title
    data.append(dict(type="scatter", name="full KV bytes", x=steps, y=[v / size for v in full_kv], mode="lines",
                     showlegend=False, line=dict(color="#7f7f7f", dash="dash"), xaxis=bottom, yaxis="y2",
                     hovertemplate=f"full: %{{y:,.1f}} {unit}<extra></extra>"))
    data.append(dict(type="scatter", name="KV bytes", x=steps, y=[v / size for v in kv], mode="lines",
                     fill="tozeroy", showlegend=False, line=dict(color=SPAN_COLOURS["image"]), xaxis=bottom,
                     yaxis="y2", hovertemplate=f"kept: %{{y:,.1f}} {unit}<extra></extra>"))
    for x, y in ((top, "y"), (bottom, "y2")):  # the step being replayed
        shapes.append(dict(type="line", xref=x, x0=step, x1=step, yref=f"{y} domain", y0=0, y1=1,
                           line=dict(color=INK, width=1)))

    share = kv[step] / full_kv[step] if full_kv[step] else 1.0
    sub = (f"{lengths[step]} entries{' (its own budget)' if per_layer else ''}; KV {kv[step] / size:,.1f} {unit} kept "
           f"vs {full_kv[step] / size:,.1f} {unit} full ({share:.0%}, all layers). Red ticks: evictions.")
    # Row heights 0.68 / 0.32 of what an 0.08 gap between them leaves.
    layout = dict(
        title=figure_title(f"Layer {shown}, step {step}: {method_name(trace.method)}", sub),
        height=height, margin=dict(l=70, r=MODEBAR_ROOM, t=title_height(sub), b=100),
        legend=dict(orientation="h", y=-0.22, yanchor="top", x=0), template=TEMPLATE,
        xaxis=dict(anchor="y", domain=[0.0, 1.0], matches="x2", showticklabels=False),
        xaxis2=dict(anchor="y2", domain=[0.0, 1.0], title=dict(text="decoding step (0 = after prefill)")),
        yaxis=dict(anchor="x", domain=[0.3744, 1.0], title=dict(text=f"entries in layer {shown}"), rangemode="tozero"),
        yaxis2=dict(anchor="x2", domain=[0.0, 0.2944], title=dict(text=f"KV ({unit})"), rangemode="tozero",
                    nticks=4),
        shapes=shapes, annotations=annotations)
    fig = go.Figure(data=data, layout=layout)
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
