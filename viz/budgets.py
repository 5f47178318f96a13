"""Budget per layer: how many entries each layer kept after the prefill, method by method.

Most methods give every layer the same budget, ``ceil(budget * T)`` entries. PrefixKV and
VL-Cache give each layer its own (``trace.layers[l].budget``): a layer whose attention is
concentrated keeps fewer entries and leaves them to layers whose attention is spread out,
so that all layers together still keep the uniform rule's total.
"""

from __future__ import annotations

import plotly.graph_objects as go

from .style import (GRID, INK, METHOD_COLOURS, MODEBAR_ROOM, TEMPLATE, figure_title, kept_after_prefill, layer_axis,
                    layer_ids, method_name, title_height)


def _as_dict(traces) -> dict:
    if hasattr(traces, "layers"):  # one trace
        return {traces.method: traces}
    return dict(traces)


def layer_budgets_figure(traces, layer: int | None = None, height: int = 360) -> go.Figure:
    """Bars of the entries each layer kept after the prefill, one series per method.

    Parameters
    ----------
    traces : elastic.Trace or dict
        One trace, or ``method -> elastic.Trace`` of several runs of one prompt (Compare).
        The full cache is left out when other methods are there (it keeps every entry).
    layer : int or None
        A layer to outline (the one the other figures show).
    height : int

    Returns
    -------
    plotly.graph_objects.Figure
        One bar trace per method, named by :func:`method_name`, with ``x`` the layer and
        ``y`` the entries it held after the prefill (``trace.lengths_of(l)[0]``);
        ``customdata`` per bar is ``[budget ratio of the layer, its budget entries
        (trace.layers[l].budget_entries), prompt length T]``. A line ``uniform budget`` at
        ``trace.budget_entries`` (``ceil(budget * T)``, every layer alike), and with
        ``layer`` a shape ``selected layer`` behind that layer's bars.
    """
    traces = _as_dict(traces)
    if len(traces) > 1:
        traces = {m: t for m, t in traces.items() if m != "full"} or traces
    fig = go.Figure()
    layers = max((t.num_layers for t in traces.values()), default=0)
    uneven = []
    for method, trace in traces.items():
        T = trace.prompt_length
        kept = kept_after_prefill(trace)
        allowed = trace.layer_budget_entries().tolist()
        ratios = [float(trace.budget if lt.budget is None else lt.budget) for lt in trace.layers]
        name = method_name(method)
        ids = layer_ids(trace)
        hover = []
        for l, (k, b, r) in enumerate(zip(kept, allowed, ratios)):
            line = f"<b>{name}, layer {ids[l]}</b><br>keeps {k} of the {T} prompt entries ({k / T:.0%})"
            if trace.budgets_per_layer:
                line += f"<br>this layer's own budget: {r:.3f} of the prompt, &lceil;{r:.3f} &times; {T}&rceil; = {b}"
            else:
                line += f"<br>the same budget in every layer: &lceil;{trace.budget:g} &times; {T}&rceil; = {b}"
            if b is not None and k > b:
                line += f"<br>raised from {b} to the method's minimum (protected tokens plus one)"
            hover.append(line)
        if trace.budgets_per_layer:
            most, least = max(range(len(kept)), key=kept.__getitem__), min(range(len(kept)), key=kept.__getitem__)
            together = ""
            if trace.budget_entries is not None:
                together = (f", {sum(kept)} in all (the uniform budget: {len(kept)} &times; {trace.budget_entries} = "
                            f"{len(kept) * trace.budget_entries})")
            uneven.append(f"{name}: layer {ids[most]} keeps most ({kept[most]}), layer {ids[least]} least ({kept[least]})"
                          + together)
        fig.add_trace(go.Bar(
            name=name, x=list(range(trace.num_layers)), y=kept,
            customdata=[[r, -1 if b is None else int(b), T] for r, b in zip(ratios, allowed)],
            hovertext=hover, hovertemplate="%{hovertext}<extra></extra>",
            marker=dict(color=METHOD_COLOURS.get(method), line=dict(width=0)),
        ))
    first = next(iter(traces.values()), None)
    if first is not None and first.budget_entries is not None and layers:
        uniform = int(first.budget_entries)
        fig.add_trace(go.Scatter(
            name="uniform budget", x=[-0.5, layers - 0.5], y=[uniform, uniform], mode="lines",
            line=dict(color=INK, dash="dash", width=2),
            hovertemplate=(f"uniform budget: &lceil;{first.budget:g} &times; {first.prompt_length}&rceil; = "
                           f"{uniform} entries in every layer<extra></extra>"),
        ))
    if layer is not None and layers:
        layer = min(max(int(layer), 0), layers - 1)
        # A dark frame around the chosen layer's bars (a grey fill alone was too faint to see).
        fig.add_shape(type="rect", xref="x", yref="paper", x0=layer - 0.5, x1=layer + 0.5, y0=0, y1=1,
                      fillcolor=GRID, line=dict(color=INK, width=2), layer="below", name="selected layer")
    if uneven:
        subtitle = "; ".join(uneven)
    elif first is not None:
        subtitle = (f"every layer keeps the same number of entries"
                    + (" (pick PrefixKV or VL-Cache for a budget per layer)" if len(traces) == 1 else ""))
    else:
        subtitle = ""
    longest = max(traces.values(), key=lambda t: t.num_layers, default=None)
    axis = layer_axis(longest, max(1, layers // 10)) if longest is not None else {}
    top, bottom = title_height(subtitle), 100
    plot_px = max(height - top - bottom, 60)
    fig.update_layout(
        title=figure_title("Entries kept per layer after the prefill", subtitle), height=height,
        barmode="group", bargap=0.25,
        xaxis=dict(title="layer", range=[-0.5, layers - 0.5], **axis),
        yaxis=dict(title="entries kept", rangemode="tozero"),
        margin=dict(l=70, r=MODEBAR_ROOM, t=top, b=bottom), legend=dict(orientation="h", y=-62 / plot_px, x=0,
                                                                        yanchor="top"),
        template=TEMPLATE,
    )
    return fig
