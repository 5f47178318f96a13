"""Attention frequency: the layer x prompt-position map of importance scores."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .style import (ANCHOR_COLOUR, COLORBAR, EVICTED_COLOUR, FONT_SIZE, INK, MODEBAR_ROOM, PROTECTED_COLOUR,
                    SPAN_COLOURS, TEMPLATE, add_span_band, figure_title, kept_after_prefill, layer_ids, log_scores,
                    method_name, title_height, token_texts)

BAND_PX = 22  # height of the span band above the plot, in px
STRIP = 0.09  # share of the plot height for the strip of the chosen layer's kept positions


def _layer_ticks(ids: list[int], layer: int | None) -> dict:
    """Layer ticks every few rows, the chosen layer's in bold with an arrow; the regular ticks
    next to it are left out so that no two labels overlap."""
    every = max(1, len(ids) // 7)
    vals = [v for v in range(0, len(ids), every) if layer is None or abs(v - layer) >= max(2, every // 2 + 1)]
    if layer is not None:
        vals = sorted(vals + [layer])
    text = [f"<b>{ids[v]} \u2192</b>" if v == layer else str(ids[v]) for v in vals]
    return dict(tickmode="array", tickvals=vals, ticktext=text)


def attention_heatmap(trace, layer: int | None = None, height: int = 400) -> go.Figure:
    """Importance of every prompt position in every layer, with token types and the chosen layer.

    Parameters
    ----------
    trace : elastic.Trace
    layer : int or None
        The layer the other figures show (an index into ``trace.layers``): its row is
        outlined, its tick label is bold, and a strip above the map marks the positions it
        kept. None: no layer chosen (no outline, no strip).
    height : int
        Figure height in pixels.

    Returns
    -------
    plotly.graph_objects.Figure
        A heatmap (trace name ``scores``) of ``log10(trace.scores_matrix())`` whose hover
        shows the raw score and token (a method that does not score draws ``kept by layer``
        instead: 1 where a layer kept a position, 0 where not). With ``layer``: a shape
        ``chosen layer`` around its row; in the strip above the map the markers ``anchors``
        (``kept`` for methods that do not merge) at the layer's kept, unprotected positions
        and ``protected`` at the protected ones (thin ticks that stay apart where neighbours
        are kept too). The other layers' kept positions are left to the map's colours and to :func:`viz.merge_groups` (a marker in every
        cell would hide the scores). One rectangle per prompt span above the plot.
        With one budget per layer (``trace.budgets_per_layer``: PrefixKV, VL-Cache) a
        narrow panel on the right has one horizontal bar per layer, ``layer budget``
        (``x`` = entries the layer kept after the prefill, ``customdata`` = [its budget
        ratio, ``layers[l].budget_entries``]), and the line ``uniform budget`` at
        ``trace.budget_entries``; otherwise the title says how many every layer keeps.
        Layer axes are labelled with the decoder index (:func:`viz.style.layer_ids`).
    """
    T, L = trace.prompt_length, trace.num_layers
    ids = layer_ids(trace)
    if layer is not None:
        layer = min(max(int(layer), 0), L - 1)
    scores = trace.scores_matrix()
    tokens = token_texts(trace, range(T))
    counts = kept_after_prefill(trace)  # entries each layer kept after the prefill
    per_layer = trace.budgets_per_layer
    strip = layer is not None
    rows, cols = (2 if strip else 1), (2 if per_layer else 1)
    fig = make_subplots(
        rows=rows, cols=cols, shared_xaxes=True, shared_yaxes=False, vertical_spacing=0.025,
        row_heights=[STRIP, 1 - STRIP] if strip else None,
        column_widths=[0.84, 0.16] if per_layer else None, horizontal_spacing=0.02,
        specs=[[{}] * cols] * rows,
    )
    main = dict(row=rows, col=1)  # the map's cell
    # The hover names the decoder layer: %{y} is it unless a hybrid model traced only some
    # layers; then (only then) every cell carries its own label.
    if ids == list(range(L)):
        hover_layers, where = [tokens] * L, "layer %{y}, position %{x} '%{text}'"
    else:
        hover_layers = [[f"layer {ids[l]}, position {p} '{tokens[p]}'" for p in range(T)] for l in range(L)]
        where = "%{text}"
    if scores is not None:
        fig.add_trace(go.Heatmap(
            name="scores",
            # float32 arrays travel as base64 typed arrays: a 32-layer x 600-token map would
            # be ~1 MB as JSON number lists.
            z=log_scores(scores).astype(np.float32),
            x=list(range(T)),
            y=list(range(L)),
            customdata=np.asarray(scores, dtype=np.float32),
            text=hover_layers,
            colorscale="Viridis",
            colorbar=dict(**COLORBAR, title=dict(text="log10 score", side="right", font=dict(size=FONT_SIZE)),
                          orientation="h", x=1, xanchor="right", len=0.42, tickangle=0, dtick=1),
            hovertemplate=where + "<br>score %{customdata:.4g}<extra></extra>",
        ), **main)
    else:
        kept = np.zeros((L, T), dtype=np.float32)
        for l, lt in enumerate(trace.layers):
            kept[l, np.asarray(lt.kept, dtype=np.int64)] = 1
        fig.add_trace(go.Heatmap(
            name="kept by layer", z=kept, x=list(range(T)), y=list(range(L)), text=hover_layers,
            colorscale=[[0, EVICTED_COLOUR], [1, SPAN_COLOURS["image"]]], zmin=0, zmax=1, showscale=False,
            hovertemplate=where + "<br>kept: %{z}<extra></extra>",
        ), **main)

    protected = set(np.asarray(trace.protected).tolist())
    anchor_name = "anchors" if trace.method == "elastic" else "kept"
    if strip:
        lt = trace.layers[layer]
        mine = [int(p) for p in lt.kept if int(p) not in protected]
        # Thin ticks on white: neighbours stay apart even where every position is kept.
        fig.add_trace(go.Scatter(
            name=anchor_name, x=mine, y=[0.5] * len(mine), mode="markers",
            marker=dict(symbol="line-ns", size=16, line=dict(color=ANCHOR_COLOUR, width=2)),
            hovertemplate=f"{anchor_name[:-1]} of layer {ids[layer]}: position %{{x}}<extra></extra>",
        ), row=1, col=1)
        prot = sorted(protected)
        fig.add_trace(go.Scatter(
            name="protected", x=prot, y=[0.5] * len(prot), mode="markers",
            marker=dict(symbol="star", size=13, color=PROTECTED_COLOUR, line=dict(color=INK, width=1)), cliponaxis=False,
            hovertemplate="protected (never merged): position %{x}<extra></extra>",
        ), row=1, col=1)
        fig.update_yaxes(range=[0, 1], visible=True, showgrid=False, zeroline=False, tickmode="array",
                         tickvals=[0.5], ticktext=[f"layer {ids[layer]} keeps"], ticks="", ticklabelstandoff=10,
                         row=1, col=1)
        # Two outlines, dark outside and white inside, read on every colour of the map.
        # A thin dark frame (half of it outside the row) leaves the row's own colours readable.
        fig.add_shape(type="rect", x0=-0.5, x1=T - 0.5, y0=layer - 0.5, y1=layer + 0.5,
                      line=dict(color=INK, width=2), fillcolor="rgba(0,0,0,0)", name="chosen layer", **main)

    if per_layer:
        ratios = [float(trace.budget if lt.budget is None else lt.budget) for lt in trace.layers]
        allowed = trace.layer_budget_entries().tolist()
        fig.add_trace(go.Bar(
            name="layer budget", orientation="h", x=counts, y=list(range(L)), showlegend=False,
            customdata=[[r, int(b)] for r, b in zip(ratios, allowed)],
            marker=dict(color=[INK if l == layer else SPAN_COLOURS["image"] for l in range(L)], line=dict(width=0)),
            text=[f"layer {i}" for i in ids], hovertemplate=(
                f"%{{text}} keeps %{{x}} of {T} entries<br>its own budget %{{customdata[0]:.3f}} "
                f"(&lceil;budget &times; {T}&rceil; = %{{customdata[1]}})<extra></extra>"),
            textposition="none",
        ), row=rows, col=2)
        uniform = int(trace.budget_entries)
        fig.add_trace(go.Scatter(
            name="uniform budget", x=[uniform, uniform], y=[-0.5, L - 0.5], mode="lines", showlegend=False,
            line=dict(color=INK, dash="dash", width=2),
            hovertemplate=f"uniform budget: {uniform} entries in every layer<extra></extra>",
        ), row=rows, col=2)
        fig.update_xaxes(title_text="kept", rangemode="tozero", showgrid=False, nticks=3, row=rows, col=2)
        fig.update_yaxes(range=[-0.5, L - 0.5], showticklabels=False, showgrid=False, row=rows, col=2)
        if strip:
            fig.update_xaxes(visible=False, row=1, col=2)
            fig.update_yaxes(visible=False, row=1, col=2)

    text = f"Attention received per layer ({method_name(trace.method)})"
    if scores is None:
        text = f"{method_name(trace.method)} does not score tokens: kept positions"
    if per_layer:
        sub = f"each layer its own budget, {min(counts)} to {max(counts)} of {T} entries (right)"
    elif len(set(counts)) == 1:
        sub = f"every layer keeps {counts[0]} of {T} entries"
    else:
        sub = f"layers keep {min(counts)} to {max(counts)} of {T} entries"
    if layer is not None:
        sub += f"; layer {ids[layer]} outlined, its kept positions in the strip on top"
    top, bottom = title_height(sub) + BAND_PX + 6, 90  # the title and the span band; ticks, axis title, legend
    plot_px = max(height - top - bottom, 60)
    add_span_band(fig, trace, y0=1 + 4 / plot_px, y1=1 + (4 + BAND_PX) / plot_px)
    below = -52 / plot_px  # the legend and the colour bar's row, under the axis title
    if scores is not None:
        fig.update_traces(colorbar=dict(y=below, yanchor="top"), selector=dict(name="scores"))
    fig.update_layout(
        title=figure_title(text, sub), height=height,
        margin=dict(l=80, r=MODEBAR_ROOM, t=top, b=bottom),
        bargap=0.15,
        legend=dict(orientation="h", y=below, yanchor="top", x=0, xanchor="left"),
        template=TEMPLATE,
    )
    fig.update_xaxes(range=[-0.5, T - 0.5], showgrid=False, row=rows, col=1)
    fig.update_xaxes(title_text="prompt position", row=rows, col=1)
    if strip:
        fig.update_xaxes(range=[-0.5, T - 0.5], showgrid=False, showticklabels=False, row=1, col=1)
    fig.update_yaxes(title_text="layer", range=[-0.5, L - 0.5], showgrid=False, **_layer_ticks(ids, layer), **main)
    return fig
