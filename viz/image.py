"""The input image with per-patch importance and kept / merged / evicted status."""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import plotly.graph_objects as go
from PIL import Image

from .state import ANCHOR, EVICTED, MERGED, PROTECTED, prompt_state
from .style import (ANCHOR_COLOUR, COLORBAR, DROPPED_COLOUR, FONT_SIZE, MODEBAR_ROOM, TEMPLATE, figure_title,
                    layer_label, log_scores, message_figure, resolve_step, title_height)

# The embedded picture travels to the browser with every figure: keep it small.
MAX_SIDE = 336
OVERLAY_OPACITY = 0.22
_PICTURES: dict = {}  # (id(image), rows, cols) -> (image, its data URI): see picture_uri
_PICTURES_LOCK = threading.Lock()


def image_grid(trace) -> tuple[int, int] | None:
    """``(rows, cols)`` of the image tokens, or None if the prompt has no mappable image.

    Uses ``trace.image_grid`` when it covers the image span exactly; otherwise a square
    span (LLaVA: 24 x 24) is taken as a square grid.
    """
    span = trace.image_span
    if span is None:
        return None
    n = span[1] - span[0]
    if trace.image_grid is not None:
        rows, cols = (int(v) for v in trace.image_grid)
        if rows * cols == n:
            return rows, cols
    side = int(round(n ** 0.5))
    return (side, side) if side * side == n and n > 0 else None


# Tiles that show the whole image (the picture is drawn under them).
WHOLE_VIEWS = ("image", "global", "thumbnail", "base", "anyres")


def tile_cells(trace):
    """Where each image cell sits in the figure: ``(positions, cell, rows, cols, boxes)``.

    One grid (LLaVA, one Qwen image): its cells as :func:`image_grid` lays them out. Several
    tiles or images (``trace.image_tiles``: SmolVLM, InternVL, LLaVA-NeXT, Pixtral rows, ...):
    the tiles side by side, one empty column apart; markers and breaks are not cells.
    ``cell[p] = (row, col)``; ``boxes`` holds ``(col0, rows, cols, kind)`` of each tile.
    None if the prompt has no mappable image.
    """
    tiles = list(getattr(trace, "image_tiles", None) or [])
    span = trace.image_span
    grid = image_grid(trace)
    if grid is not None and (len(tiles) <= 1 or span is None):
        rows, cols = grid
        positions = list(range(span[0], span[0] + rows * cols))
        return positions, {p: divmod(p - span[0], cols) for p in positions}, rows, cols, [(0, rows, cols, "image")]
    if not tiles:
        return None
    positions, cell, boxes, col0 = [], {}, [], 0
    for tile in tiles:
        for k, p in enumerate(tile.positions):
            positions.append(int(p))
            cell[int(p)] = (k // tile.cols, col0 + k % tile.cols)
        boxes.append((col0, tile.rows, tile.cols, tile.kind))
        col0 += tile.cols + 1
    return positions, cell, max(t.rows for t in tiles), col0 - 1, boxes


def picture_uri(image: Image.Image, rows: int, cols: int) -> str:
    """:func:`fit_image` as the PNG data URI plotly would make of it. Kept for the last few
    images (by identity: a PIL image has no hash): encoding it is half of a redraw, and the
    live panel redraws the same picture at every tick."""
    key = (id(image), rows, cols)
    held = _PICTURES.get(key)
    if held is None or held[0] is not image:  # an id is reused only once its image is gone
        picture = io.BytesIO()
        fit_image(image, rows, cols).save(picture, format="PNG")
        held = (image, "data:image/png;base64," + base64.b64encode(picture.getvalue()).decode("ascii"))
        with _PICTURES_LOCK:  # sessions draw from several threads
            _PICTURES[key] = held
            while len(_PICTURES) > 4:
                _PICTURES.pop(next(iter(_PICTURES)))
    return held[1]


def fit_image(image: Image.Image, rows: int, cols: int) -> Image.Image:
    """Centre-crop ``image`` to the grid's aspect ratio and shrink it for display.

    LLaVA-1.5's processor resizes the short side and centre-crops to a square, so the
    crop is what the patches actually saw; Qwen2-VL resizes to the grid's aspect, so the
    crop only trims rounding margins.
    """
    image = image.convert("RGB")
    w, h = image.size
    target = cols / rows
    if w / h > target:
        new_w = max(1, round(h * target))
        left = (w - new_w) // 2
        image = image.crop((left, 0, left + new_w, h))
    elif w / h < target:
        new_h = max(1, round(w / target))
        top = (h - new_h) // 2
        image = image.crop((0, top, w, top + new_h))
    image = image.copy()
    image.thumbnail((MAX_SIDE, MAX_SIDE))
    return image


def image_overlay(trace, image: Image.Image | None = None, layer: int = 0, step: int | None = None,
                  height: int = 460) -> go.Figure:
    """Per-patch importance and status of ``layer`` at ``step``, over the input image.

    Parameters
    ----------
    trace : elastic.Trace
    image : PIL.Image.Image or None
        The input image (drawn under the cells when given).
    layer : int
    step : int or None
        Decode step to replay (None = the last one).
    height : int

    Returns
    -------
    plotly.graph_objects.Figure
        A heatmap ``patches`` with one cell per image token (``rows x cols`` from
        :func:`image_grid`, row-major): ``log10`` score where the method scores,
        else 1 for held and 0 for gone; ``customdata`` = [position, holding entry].
        Markers ``anchors`` (kept image tokens), ``evicted at prefill`` and ``removed while
        decoding`` sit on their cells.
    """
    layout = tile_cells(trace)
    if layout is None:
        return message_figure("This prompt has no image tokens to map onto the image.", "The image", height=200)
    positions, cell, rows, cols, boxes = layout
    step = resolve_step(trace, step)
    state = prompt_state(trace, layer, step)
    positions = np.asarray(positions, dtype=np.int64)
    at = np.full((rows, cols), -1, dtype=np.int64)  # the position in each cell, -1 between tiles
    for p in positions.tolist():
        at[cell[p]] = p

    def mosaic(values, empty=None):
        """``[rows, cols]`` list of ``values`` (one per position) in their cells."""
        out = [[empty] * cols for _ in range(rows)]
        for p, v in zip(positions.tolist(), values):
            out[cell[p][0]][cell[p][1]] = v
        return out

    lt = trace.layers[layer]

    labels = []
    for p in positions.tolist():
        status, g = state.status[p], int(state.group[p])
        text = f"position {p} (row {cell[p][0]}, col {cell[p][1]})<br>"
        if status == MERGED:
            where = f"row {cell[g][0]}, col {cell[g][1]}" if g in cell else trace.token_type(g)
            text += f"merged into {g} ({where})"
        elif status == EVICTED:
            text += "evicted at the prefill"
        else:
            text += "kept (anchor)" if status == ANCHOR else status
        if state.dropped[p]:
            text += f"<br>removed while decoding at step {state.dropped_at[p]}"
        if lt.scores is not None:
            text += f"<br>score {float(lt.scores[p]):.4g}"
        labels.append(text)

    if lt.scores is not None:
        z = mosaic(log_scores(lt.scores[positions]).tolist())
        # Right of the picture, inside the right margin's first part: the toolbar's column
        # (MODEBAR_ROOM) stays clear of it.
        colorscale, colorbar = "Viridis", dict(**COLORBAR, title=dict(text="log10<br>score", side="top",
                                                                       font=dict(size=FONT_SIZE)),
                                               x=1, xanchor="left", xpad=8, len=0.9)
    else:
        # No scores: colour by whether the patch still lives in the cache.
        alive = (state.group[positions] >= 0) & ~state.dropped[positions]
        z = mosaic(alive.astype(float).tolist())
        colorscale, colorbar = [[0, "rgba(40,40,40,0.9)"], [1, "rgba(42,157,143,0.15)"]], None

    # Built as plain data and handed to plotly once (add_trace and update_layout validate on
    # every call: this figure is redrawn live while an answer streams).
    data = [dict(
        type="heatmap", name="patches", z=z, x=list(range(cols)), y=list(range(rows)),
        customdata=[[[int(at[r, c]), int(state.group[at[r, c]])] if at[r, c] >= 0 else None
                     for c in range(cols)] for r in range(rows)],
        text=mosaic(labels, ""),
        hovertemplate="%{text}<extra></extra>", colorscale=colorscale, showscale=colorbar is not None,
        colorbar=colorbar, xgap=0.5, ygap=0.5,
        # Light enough over the picture that a shape keeps its own colour (orange stays orange).
        opacity=OVERLAY_OPACITY if image is not None else 1.0,
    )]

    def cells(name, ps, symbol, colour, size):
        ps = [int(p) for p in ps]
        data.append(dict(
            type="scatter", name=name, x=[cell[p][1] for p in ps], y=[cell[p][0] for p in ps], mode="markers",
            customdata=ps, marker=dict(symbol=symbol, color=colour, size=size, line=dict(color=colour, width=1.5)),
            hovertemplate=f"{name}: position %{{customdata}}<extra></extra>",
        ))

    image_status = [state.status[p] for p in positions]
    kept = [p for p, s in zip(positions, image_status) if s in (ANCHOR, PROTECTED)]
    marker_size = max(3, min(10, int(300 / max(rows, cols))))
    cells("anchors" if trace.method == "elastic" else "kept", kept, "circle-open", ANCHOR_COLOUR, marker_size)
    cells("merged into an anchor", [p for p, s in zip(positions, image_status) if s == MERGED], "circle-dot",
          "#8a8a8a", max(2, marker_size // 2))
    cells("evicted at prefill", [p for p, s in zip(positions, image_status) if s == EVICTED], "x-thin-open",
          "#444444", marker_size)
    cells("removed while decoding", positions[state.dropped[positions]], "x-thin-open", DROPPED_COLOUR, marker_size)

    # The picture under each tile that shows the whole image (the app sends one image per prompt).
    pictures = [dict(source=picture_uri(image, tile_rows, tile_cols), xref="x", yref="y", x=col0 - 0.5, y=-0.5,
                     sizex=tile_cols, sizey=tile_rows, xanchor="left", yanchor="top", sizing="stretch", layer="below",
                     name="input")
                for col0, tile_rows, tile_cols, kind in (boxes if image is not None else [])
                if kind in WHOLE_VIEWS or len(boxes) == 1]
    n_kept = len(kept)
    n_merged = sum(s == MERGED for s in image_status)
    sub = (f"prefill kept {n_kept}, merged {n_merged}, evicted {len(positions) - n_kept - n_merged} of {len(positions)}; "
           f"removed while decoding {int(state.dropped[positions].sum())}")
    fig = go.Figure(data=data, layout=dict(
        title=figure_title(f"Image tokens, layer {layer_label(trace, layer)}, step {step}", sub),
        height=height, margin=dict(l=20, r=MODEBAR_ROOM + 76, t=title_height(sub), b=70),
        xaxis=dict(range=[-0.5, cols - 0.5], showgrid=False, zeroline=False, showticklabels=False, constrain="domain"),
        yaxis=dict(range=[rows - 0.5, -0.5], showgrid=False, zeroline=False, showticklabels=False,
                   scaleanchor="x", scaleratio=1, constrain="domain"),
        legend=dict(orientation="h", y=-0.02, x=0),
        template=TEMPLATE, images=pictures,
    ))
    return fig
