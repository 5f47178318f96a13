"""Attention frequency: the layer x prompt-position map of importance scores."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .style import (ANCHOR_COLOUR, INK, PROTECTED_COLOUR, SPAN_COLOURS, TEMPLATE, add_span_band, kept_after_prefill,
                    log_scores, method_name, token_texts)


def attention_heatmap(trace, height: int = 340) -> go.Figure:
    """Importance of every prompt position in every layer, with token types and anchors.

    Parameters
    ----------
    trace : elastic.Trace
    height : int
        Figure height in pixels.

    Returns
    -------
    plotly.graph_objects.Figure
        A heatmap (trace name ``scores``) of ``log10(trace.scores_matrix())`` whose hover
        shows the raw score and token; markers ``anchors`` at every layer's kept,
        unprotected positions and ``protected`` at the protected ones; one rectangle per
        prompt span above the plot. Methods that do not score draw the markers only.
        With one budget per layer (``trace.budgets_per_layer``: PrefixKV, VL-Cache) a
        narrow panel on the right has one horizontal bar per layer, ``layer budget``
        (``x`` = entries the layer kept after the prefill, ``customdata`` = [its budget
        ratio, ``layers[l].budget_entries``]), and the line ``uniform budget`` at
        ``trace.budget_entries``; otherwise the title says how many every layer keeps.
    """
    T, L = trace.prompt_length, trace.num_layers
    scores = trace.scores_matrix()
    tokens = token_texts(trace, range(T))
    counts = kept_after_prefill(trace)  # entries each layer kept after the prefill
    per_layer = trace.budgets_per_layer
    if per_layer:
        fig = make_subplots(rows=1, cols=2, shared_yaxes=True, column_widths=[0.84, 0.16], horizontal_spacing=0.02)
    else:
        fig = go.Figure()
    if scores is not None:
        fig.add_trace(go.Heatmap(
            name="scores",
            # float32 arrays travel as base64 typed arrays: a 32-layer x 600-token map would
            # be ~1 MB as JSON number lists.
            z=log_scores(scores).astype(np.float32),
            x=list(range(T)),
            y=list(range(L)),
            customdata=np.asarray(scores, dtype=np.float32),
            text=[tokens] * L,
            colorscale="Viridis",
            colorbar=dict(title=dict(text="log10<br>score", side="top"), thickness=12, len=0.9),
            hovertemplate="layer %{y}, position %{x} '%{text}'<br>score %{customdata:.4g}<extra></extra>",
        ))
    protected = set(np.asarray(trace.protected).tolist())
    xs, ys = [], []
    for layer, lt in enumerate(trace.layers):
        kept = [int(p) for p in lt.kept if int(p) not in protected]
        xs += kept
        ys += [layer] * len(kept)
    anchor_name = "anchors" if trace.method == "elastic" else "kept"
    fig.add_trace(go.Scatter(
        name=anchor_name, x=xs, y=ys, mode="markers",
        marker=dict(symbol="circle", size=5, color="white", line=dict(color=ANCHOR_COLOUR, width=1)),
        hovertemplate=f"{anchor_name[:-1]}: layer %{{y}}, position %{{x}}<extra></extra>",
    ))
    prot = sorted(protected)
    fig.add_trace(go.Scatter(
        name="protected", x=[p for p in prot for _ in range(L)], y=[layer for _ in prot for layer in range(L)],
        mode="markers", marker=dict(symbol="star", size=9, color=PROTECTED_COLOUR, line=dict(color="black", width=1)),
        hovertemplate="protected: position %{x}<extra></extra>",
    ))
    if per_layer:
        ratios = [float(trace.budget if lt.budget is None else lt.budget) for lt in trace.layers]
        allowed = trace.layer_budget_entries().tolist()
        fig.add_trace(go.Bar(
            name="layer budget", orientation="h", x=counts, y=list(range(L)), showlegend=False,
            customdata=[[r, int(b)] for r, b in zip(ratios, allowed)],
            marker=dict(color=SPAN_COLOURS["image"], line=dict(width=0)),
            hovertemplate=(f"layer %{{y}} keeps %{{x}} of {T} entries<br>its own budget %{{customdata[0]:.3f}} "
                           f"(&lceil;budget &times; {T}&rceil; = %{{customdata[1]}})<extra></extra>"),
        ), row=1, col=2)
        uniform = trace.budget_entries if trace.budget_entries is not None else round(trace.budget * T)
        fig.add_trace(go.Scatter(
            name="uniform budget", x=[uniform, uniform], y=[-0.5, L - 0.5], mode="lines", showlegend=False,
            line=dict(color=INK, dash="dash"),
            hovertemplate=f"uniform budget: {uniform} entries in every layer<extra></extra>",
        ), row=1, col=2)
        fig.update_xaxes(title_text="kept", rangemode="tozero", showgrid=False, row=1, col=2)
    # The span band sits above the plotting area so it never hides a score.
    add_span_band(fig, trace, y0=1.02, y1=1.13)
    title = f"Attention received per layer ({method_name(trace.method)})"
    if scores is None:
        title = f"{method_name(trace.method)} does not score tokens: kept positions only"
    if per_layer:
        title += f"; each layer its own budget, {min(counts)} to {max(counts)} of {T} entries (right)"
    elif len(set(counts)) == 1:
        title += f"; every layer keeps {counts[0]} of {T} entries"
    fig.update_layout(
        title=dict(text=title, y=0.98, font=dict(size=14)),
        height=height,
        margin=dict(l=50, r=20, t=70, b=40),
        xaxis=dict(title="prompt position", range=[-0.5, T - 0.5], showgrid=False),
        yaxis=dict(title="layer", range=[-0.5, L - 0.5], showgrid=False, dtick=max(1, L // 8)),
        bargap=0.15,
        legend=dict(orientation="h", y=-0.22, x=0),
        template=TEMPLATE,
    )
    return fig
