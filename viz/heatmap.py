"""Attention frequency: the layer x prompt-position map of importance scores."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from .style import ANCHOR_COLOUR, PROTECTED_COLOUR, TEMPLATE, add_span_band, log_scores, method_name, token_texts


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
    """
    T, L = trace.prompt_length, trace.num_layers
    scores = trace.scores_matrix()
    tokens = token_texts(trace, range(T))
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
    # The span band sits above the plotting area so it never hides a score.
    add_span_band(fig, trace, y0=1.02, y1=1.13)
    title = f"Attention received per layer ({method_name(trace.method)})"
    if scores is None:
        title = f"{method_name(trace.method)} does not score tokens: kept positions only"
    fig.update_layout(
        title=dict(text=title, y=0.98, font=dict(size=14)),
        height=height,
        margin=dict(l=50, r=20, t=70, b=40),
        xaxis=dict(title="prompt position", range=[-0.5, T - 0.5], showgrid=False),
        yaxis=dict(title="layer", range=[-0.5, L - 0.5], showgrid=False, dtick=max(1, L // 8)),
        legend=dict(orientation="h", y=-0.22, x=0),
        template=TEMPLATE,
    )
    return fig
