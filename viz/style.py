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
EVICTED_COLOUR = "#d9d9d9"
DROPPED_COLOUR = "#c0392b"  # entries removed while decoding
ANCHOR_COLOUR = "#111111"
PROTECTED_COLOUR = "#f4c20d"

# Every figure reads from the back of a room, on gradio's light and dark themes alike.
# A transparent figure cannot: no single text colour reaches WCAG AA (4.5:1) on both a white
# page and gradio 6.31's dark page (#0b0f19; a block there is #1f2937): at best 4.4:1. So every
# figure has its own white background and near-black text (a white card on the dark theme).
PAPER = "#ffffff"
INK = "#1f2937"  # 14.7:1 on white (gradio's own body text colour)
MUTED = "#4b5563"  # subtitles and notes: 7.6:1 on white
GRID = "rgba(31,41,55,0.14)"
FONT_SIZE = 14  # the smallest text in any figure, in px
TITLE_SIZE = 18
# The modebar (plotly's toolbar, shown on hover) stands as a column in the right margin, so
# it never covers a title; the right margin of every figure keeps room for it.
MODEBAR_ROOM = 44
# Only what these figures use (plotly_white's 2-D parts): a lean template is validated and
# sent with every figure, and a slider move redraws several.
_WHITE = pio.templates["plotly_white"].layout
TEMPLATE = go.layout.Template(layout=dict(
    colorway=_WHITE.colorway, hovermode="closest", autotypenumbers="strict",
    xaxis=dict(ticks="", automargin=True, zerolinewidth=2, title=dict(standoff=15)),
    yaxis=dict(ticks="", automargin=True, zerolinewidth=2, title=dict(standoff=15)),
    annotationdefaults=dict(arrowcolor=INK, arrowhead=0, arrowwidth=1), shapedefaults=dict(line=dict(color=INK)),
))
TEMPLATE.layout.update(
    paper_bgcolor=PAPER, plot_bgcolor=PAPER, font=dict(size=FONT_SIZE, color=INK),
    title=dict(font=dict(size=TITLE_SIZE, color=INK)),
    hoverlabel=dict(bgcolor=PAPER, bordercolor=INK, font=dict(size=FONT_SIZE, color=INK)),
    legend=dict(font=dict(size=FONT_SIZE, color=INK), bgcolor="rgba(0,0,0,0)"),
    modebar=dict(orientation="v", bgcolor="rgba(255,255,255,0.9)", color=MUTED, activecolor=INK,
                 remove=["lasso2d", "select2d", "zoomIn2d", "zoomOut2d", "autoScale2d"]),
    xaxis=dict(gridcolor=GRID, zerolinecolor=GRID, linecolor=GRID, tickfont=dict(size=FONT_SIZE, color=INK),
               title=dict(font=dict(size=FONT_SIZE + 1, color=INK))),
    yaxis=dict(gridcolor=GRID, zerolinecolor=GRID, linecolor=GRID, tickfont=dict(size=FONT_SIZE, color=INK),
               title=dict(font=dict(size=FONT_SIZE + 1, color=INK))),
)
# Colour bars take their fonts from the trace, not the layout template's axes.
COLORBAR = dict(tickfont=dict(size=FONT_SIZE, color=INK), thickness=14)


def figure_title(text: str, subtitle: str = "", width: int = 72) -> dict:
    """A figure title at the top left: ``text`` at 18 px, ``subtitle`` (wrapped at
    ``width`` characters) at 14 px below it, clear of the modebar in the right margin."""
    out = dict(text=text, x=0, xref="container", xanchor="left", y=1, yref="container", yanchor="top",
               pad=dict(l=12, t=10), font=dict(size=TITLE_SIZE, color=INK))
    if subtitle:
        out["subtitle"] = dict(text=wrap(subtitle, width), font=dict(size=FONT_SIZE, color=MUTED))
    return out


def title_height(subtitle: str = "", width: int = 72) -> int:
    """Pixels the title of :func:`figure_title` takes from the top of the figure."""
    lines = wrap(subtitle, width).count("<br>") + 1 if subtitle else 0
    return 10 + 26 + 20 * lines + 8


def wrap(text: str, width: int) -> str:
    """Break ``text`` into lines of at most ``width`` characters joined by ``<br>``
    (plotly never wraps a title itself: a long one runs out of the figure)."""
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "<br>".join(lines + [line])


def layer_ids(trace) -> list[int]:
    """Decoder index of each traced layer (``trace.layer_ids``: a hybrid model traces only
    its full-attention layers), else ``0 .. L-1``. Every layer axis and label reads this."""
    ids = getattr(trace, "layer_ids", None)
    return [int(i) for i in ids] if ids is not None else list(range(trace.num_layers))


def layer_label(trace, layer: int) -> int:
    """The decoder index shown for traced layer ``layer``."""
    return layer_ids(trace)[layer]


def layer_axis(trace, every: int = 1) -> dict:
    """Axis ticks at traced layers ``0, every, 2*every, ...`` labelled with their decoder index."""
    ids = layer_ids(trace)
    vals = list(range(0, len(ids), max(1, every)))
    return dict(tickmode="array", tickvals=vals, ticktext=[str(ids[i]) for i in vals])


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


def luminance(colour: str) -> float:
    """WCAG relative luminance of a ``#rrggbb`` colour."""
    rgb = [int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    rgb = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
    return 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]


def ink_on(fill: str) -> str:
    """Near-black or white, whichever reads better on ``fill`` (a ``#rrggbb`` colour)."""
    dark, light = "#111111", "#ffffff"
    on = luminance(fill)
    return dark if (on + 0.05) / (luminance(dark) + 0.05) >= (1.05 / (on + 0.05)) else light


def span_band(trace, y0: float, y1: float, yref: str = "paper", xref: str = "x") -> tuple[list, list]:
    """One coloured rectangle per prompt span (system / image / instruction) and its name, as
    layout ``(shapes, annotations)`` dicts.

    A name sits on a box of its span's colour, in the ink that reads on it; the first span's
    name starts at its left edge and the last one's ends at its right edge, so no name runs
    out of the figure.
    """
    spans = sorted(trace.spans.items(), key=lambda item: item[1][0])
    shapes, annotations = [], []
    for i, (name, (start, end)) in enumerate(spans):
        colour = SPAN_COLOURS.get(name, SPAN_COLOURS["text"])
        shapes.append(dict(type="rect", xref=xref, yref=yref, x0=start - 0.5, x1=end - 0.5, y0=y0, y1=y1,
                           fillcolor=colour, line=dict(width=0), name=f"span:{name}"))
        x, anchor = (start + end - 1) / 2, "center"
        if i == 0 and len(spans) > 1:
            x, anchor = start - 0.5, "left"
        elif i == len(spans) - 1 and len(spans) > 1:
            x, anchor = end - 0.5, "right"
        annotations.append(dict(
            x=x, y=(y0 + y1) / 2, xref=xref, yref=yref, text=name, xanchor=anchor, yanchor="middle",
            showarrow=False, bgcolor=colour, borderpad=1, font=dict(size=FONT_SIZE, color=ink_on(colour)),
            name=f"span label:{name}"))
    return shapes, annotations


def add_span_band(fig: go.Figure, trace, y0: float, y1: float, yref: str = "paper", xref: str = "x") -> None:
    """Draw :func:`span_band` on ``fig``."""
    shapes, annotations = span_band(trace, y0, y1, yref, xref)
    for shape in shapes:
        fig.add_shape(**shape)
    for annotation in annotations:
        fig.add_annotation(**annotation)


def message_figure(text: str, title: str = "", height: int = 260) -> go.Figure:
    """An empty figure that says why there is nothing to draw."""
    fig = go.Figure()
    fig.add_annotation(text=wrap(text, 60), x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=FONT_SIZE + 2, color=INK))
    fig.update_layout(
        title=figure_title(title) if title else None, height=height, xaxis=dict(visible=False),
        yaxis=dict(visible=False), margin=dict(l=20, r=MODEBAR_ROOM, t=title_height() if title else 20, b=20),
        template=TEMPLATE,
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
