"""Shared colours and small helpers for every figure (labels, spans, statuses).

Everything here reads a :class:`elastic.Trace`; nothing recomputes the algorithm.
"""

from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

SPAN_COLOURS = {
    "system": "#9e9e9e",
    "image": "#2a9d8f",
    "history": "#c08552",  # earlier turns of a multi-turn chat
    "instruction": "#e76f51",
    "text": "#c9c9c9",
    "generated": "#4d4d4d",  # dark grey: no merge-group colour looks like it
}
# Neighbouring merge groups get different colours; 12 is plenty to tell neighbours apart.
GROUP_COLOURS = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    "#e377c2", "#17becf", "#bcbd22", "#393b79", "#ad494a", "#637939",
]
EVICTED_COLOUR = "#d9d9d9"
DROPPED_COLOUR = "#c0392b"  # entries removed while decoding
ANCHOR_COLOUR = "#111111"
PROTECTED_COLOUR = "#f4c20d"

# Every figure's template: transparent backgrounds and mid-grey text and grid, so the same
# figure reads on gradio's light and dark themes (plotly_white is a white box on a dark page).
INK = "#8a8a8a"  # contrast 3.4:1 on white, 5.6:1 on gradio's dark background
GRID = "rgba(128,128,128,0.25)"
TEMPLATE = go.layout.Template(pio.templates["plotly_white"])
TEMPLATE.layout.update(
    paper_bgcolor="rgba(0,0,0,0)", plot_bgcolor="rgba(0,0,0,0)", font=dict(color=INK),
    xaxis=dict(gridcolor=GRID, zerolinecolor=GRID, linecolor=GRID), yaxis=dict(gridcolor=GRID, zerolinecolor=GRID,
                                                                                 linecolor=GRID),
)

# log10 of a score of exactly zero would be -inf; no real attention mass is this small.
SCORE_FLOOR = 1e-6

METHOD_NAMES = {"full": "Full cache", "elastic": "Elastic Cache", "h2o": "H2O", "local": "Local (StreamingLLM)",
                "snapkv": "SnapKV", "tova": "TOVA", "prefixkv": "PrefixKV", "vlcache": "VL-Cache", "lookm": "LOOK-M",
                "h2o-ref": "H2O (reference code)"}
# One colour per method wherever several are drawn together (Compare's figures).
METHOD_COLOURS = {"full": "#7f7f7f", "elastic": SPAN_COLOURS["image"], "h2o": SPAN_COLOURS["instruction"],
                  "local": "#7b5ea7", "snapkv": "#1f77b4", "tova": "#bcbd22", "prefixkv": "#d62728",
                  "vlcache": "#e377c2", "lookm": "#8c564b", "h2o-ref": "#c08552"}


def resolve_step(trace, step) -> int:
    """``step`` as a valid decode step of ``trace`` (None: the last one, out of range: clipped)."""
    last = trace.decode_steps
    if step is None:
        return last
    return int(min(max(int(step), 0), last))


def token_text(trace, position: int) -> str:
    """The text of ``position``, escaped for plotly hover labels (``<s>`` would be markup)."""
    tokens = trace.tokens
    if tokens is None or not 0 <= position < len(tokens):
        return ""
    return html.escape(repr(str(tokens[position]))[1:-1], quote=False)


def token_texts(trace, positions) -> list[str]:
    return [token_text(trace, int(p)) for p in positions]


def log_scores(scores: np.ndarray) -> np.ndarray:
    """log10 of importance scores: a few sink tokens take most attention, so a linear scale
    would show one bright column and nothing else."""
    return np.log10(np.maximum(np.asarray(scores, dtype=np.float64), SCORE_FLOOR))


def span_names(trace) -> list[str]:
    """The token type of every prompt position (``system``, ``image``, ...)."""
    return [trace.token_type(p) for p in range(trace.prompt_length)]


def add_span_band(fig: go.Figure, trace, y0: float, y1: float, yref: str = "paper", xref: str = "x") -> None:
    """Draw one coloured rectangle per prompt span (system / image / instruction) with its name."""
    for name, (start, end) in trace.spans.items():
        colour = SPAN_COLOURS.get(name, SPAN_COLOURS["text"])
        fig.add_shape(
            type="rect", xref=xref, yref=yref, x0=start - 0.5, x1=end - 0.5, y0=y0, y1=y1,
            fillcolor=colour, line=dict(width=0), opacity=0.85, name=f"span:{name}",
        )
        fig.add_annotation(
            x=(start + end - 1) / 2, y=(y0 + y1) / 2, xref=xref, yref=yref, text=name,
            showarrow=False, font=dict(size=10, color="white"), yanchor="middle",
        )


def message_figure(text: str, title: str = "", height: int = 260) -> go.Figure:
    """An empty figure that says why there is nothing to draw."""
    fig = go.Figure()
    fig.add_annotation(text=text, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font=dict(size=14))
    fig.update_layout(
        title=title, height=height, xaxis=dict(visible=False), yaxis=dict(visible=False),
        margin=dict(l=20, r=20, t=50 if title else 20, b=20), template=TEMPLATE,
    )
    return fig


def method_name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def kept_after_prefill(trace) -> list[int]:
    """Entries each layer held right after the prefill (``trace.lengths_of(l)[0]``): with
    one budget per layer (PrefixKV, VL-Cache) they differ from layer to layer."""
    return [int(trace.lengths_of(layer)[0]) for layer in range(trace.num_layers)]


def entries_text(n) -> str:
    """A number of entries: ``27``, or ``31.7`` for a mean over layers of different lengths."""
    n = float(n)
    return f"{n:.0f}" if n.is_integer() else f"{n:.1f}"


def variant_text(trace) -> str:
    """``"importance=debiased, protect=instruction"``: how the run differs from the paper's method."""
    return ", ".join(f"{k}={v}" for k, v in (getattr(trace, "variant", None) or {}).items())


def human_bytes(n: float) -> str:
    """``123456`` -> ``"120.6 KiB"``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
