"""viz: every figure draws exactly the trace's data (compared against the trace arrays)."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

import elastic
import viz
from tiny import tiny_llama

T, NEW = 90, 16
SPANS = {"system": (0, 10), "image": (10, 74), "instruction": (74, 90)}


def _run(model, method, **params):
    ids = torch.randint(4, 64, (1, T), generator=torch.Generator().manual_seed(3))
    cache = elastic.make_cache(method, **params)
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                   do_sample=False, cache=cache, pad_token_id=1)
    cache.annotate(spans=SPANS, image_grid=(8, 8), tokens=[f"w<{i}>" for i in range(T + NEW)])
    return cache.trace


@pytest.fixture(scope="module")
def traces():
    model = elastic.attach(tiny_llama(layers=3, sharpness=4.0))
    return {
        "elastic": _run(model, "elastic", budget=0.3, distance=-8),
        "h2o": _run(model, "h2o", budget=0.3),
        "local": _run(model, "local", budget=0.3),
        "full": _run(model, "full"),
    }


def layered_model():
    """A tiny Llama whose layers attend very differently (diffuse, medium, sharp), so
    PrefixKV and VL-Cache give them different budgets (a random model's layers are alike)."""
    model = tiny_llama(layers=3, sharpness=1.0)
    with torch.no_grad():
        for factor, layer in zip((0.5, 8.0, 60.0), model.model.layers):
            layer.self_attn.q_proj.weight.mul_(factor)
    return elastic.attach(model)


def _run_annotated(model, method, **params):
    """As ``_run``, with the spans known at the prefill (VL-Cache votes with the text after the image)."""
    ids = torch.randint(4, 64, (1, T), generator=torch.Generator().manual_seed(3))
    cache = elastic.make_cache(method, **params)
    cache.annotate(spans=SPANS, image_grid=(8, 8), tokens=[f"w<{i}>" for i in range(T + NEW)])
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                   do_sample=False, cache=cache, pad_token_id=1)
    return cache.trace


LAYERED = ("prefixkv", "prefixkv-ratios", "vlcache", "lookm", "elastic", "elastic-similar", "full")


@pytest.fixture(scope="module")
def layered():
    """Traces of the new policies (and Elastic, full) at budget 0.3 on ``layered_model``."""
    model = layered_model()
    return {
        "prefixkv": _run_annotated(model, "prefixkv", budget=0.3, distance=-8),
        "prefixkv-ratios": _run_annotated(model, "prefixkv", budget=0.3, distance=-8, ratios=(1.0, 2.0, 3.0)),
        "vlcache": _run_annotated(model, "vlcache", budget=0.3),
        "lookm": _run_annotated(model, "lookm", budget=0.3),
        "elastic": _run_annotated(model, "elastic", budget=0.3, distance=-8),
        "elastic-similar": _run_annotated(model, "elastic", budget=0.3, distance=-8, prefill="similar"),
        "full": _run_annotated(model, "full"),
    }


UNIFORM = math.ceil(Fraction(3, 10) * T)  # ceil(0.3 * 90) = 27 entries: the uniform budget, exactly


def arr(value):
    """A plotly data field as a numpy array (decodes base64 typed arrays if present)."""
    if isinstance(value, dict) and "bdata" in value:
        out = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = value.get("shape")
        if isinstance(shape, str):  # plotly writes "2, 3"
            shape = [int(n) for n in shape.split(",")]
        return out.reshape(shape) if shape else out
    return np.asarray(value)


def data(fig, name):
    """The (JSON round-tripped, as the browser gets it) trace called ``name``."""
    found = [t for t in json.loads(fig.to_json())["data"] if t.get("name") == name]
    assert len(found) == 1, f"expected one trace named {name!r}, got {len(found)}"
    return found[0]


def names(fig):
    return [t.name for t in fig.data]


def heading(fig):
    """Title and subtitle as one line (long subtitles are wrapped with <br>)."""
    sub = fig.layout.title.subtitle.text or ""
    return f"{fig.layout.title.text} {sub}".replace("<br>", " ")


@pytest.fixture
def image():
    img = Image.new("RGB", (120, 80), "white")
    img.paste((255, 0, 0), (0, 0, 40, 40))
    return img


def test_fixture_traces_are_interesting(traces):
    # The checks below mean little unless merging and decode-time evictions happened.
    t = traces["elastic"]
    assert len(t.layers[0].merged) > 0 and len(t.evictions) > 0 and t.fixed_point is not None


# -- attention heatmap -------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["elastic", "h2o"])
def test_heatmap_is_the_score_matrix(traces, method):
    t = traces[method]
    fig = viz.attention_heatmap(t)
    heat = data(fig, "scores")
    np.testing.assert_allclose(arr(heat["z"]), np.log10(np.maximum(t.scores_matrix(), 1e-6)), rtol=1e-6)
    np.testing.assert_allclose(arr(heat["customdata"]), t.scores_matrix(), rtol=1e-6)
    assert arr(heat["x"]).tolist() == list(range(t.prompt_length))
    assert arr(heat["y"]).tolist() == list(range(t.num_layers))


@pytest.mark.parametrize("method", ["elastic", "h2o", "local"])
@pytest.mark.parametrize("layer", [0, 2])
def test_heatmap_marks_the_chosen_layer_and_its_kept_positions(traces, method, layer):
    t = traces[method]
    fig = viz.attention_heatmap(t, layer=layer)
    name = "anchors" if method == "elastic" else "kept"
    protected = set(t.protected.tolist())
    expected = [p for p in range(t.prompt_length) if t.layers[layer].group[p] == p and p not in protected]
    assert arr(data(fig, name)["x"]).tolist() == expected  # the chosen layer's own kept positions
    assert sorted(arr(data(fig, "protected")["x"]).tolist()) == sorted(protected)
    frame = [s for s in fig.layout.shapes if s.name == "chosen layer"]
    assert len(frame) == 1 and (frame[0].y0, frame[0].y1) == (layer - 0.5, layer + 0.5)
    axis = fig.layout[frame[0].yref.replace('y', 'yaxis')]
    ticks = dict(zip(axis.tickvals, axis.ticktext))
    assert ticks[layer].startswith("<b>") and str(layer) in ticks[layer]  # the chosen layer's label stands out
    assert len(axis.tickvals) == len(set(axis.tickvals))
    assert all(abs(v - layer) >= 2 for v in axis.tickvals if v != layer)  # no label on top of it


def test_heatmap_without_a_chosen_layer_has_no_strip(traces):
    fig = viz.attention_heatmap(traces["elastic"])
    assert "anchors" not in names(fig) and not [s for s in fig.layout.shapes if s.name == "chosen layer"]


def test_heatmap_band_is_the_spans(traces):
    t = traces["elastic"]
    fig = viz.attention_heatmap(t, layer=1)
    band = {s.name[len("span:"):]: (s.x0 + 0.5, s.x1 + 0.5) for s in fig.layout.shapes if (s.name or "").startswith("span:")}
    assert band == {k: tuple(map(float, v)) for k, v in SPANS.items()}
    labels = {a.text: a for a in fig.layout.annotations if (a.name or "").startswith("span label:")}
    # The first name starts at its span, the last ends at its span: neither runs out of the figure.
    assert (labels["system"].x, labels["system"].xanchor) == (-0.5, "left")
    assert (labels["instruction"].x, labels["instruction"].xanchor) == (T - 0.5, "right")
    assert labels["image"].xanchor == "center"


def test_heatmap_without_scores_draws_what_each_layer_kept(traces):
    t = traces["local"]
    fig = viz.attention_heatmap(t, layer=0)
    assert "scores" not in names(fig)
    assert "does not score" in fig.layout.title.text
    kept = arr(data(fig, "kept by layer")["z"])
    expected = [[1.0 if t.layers[l].group[p] == p else 0.0 for p in range(T)] for l in range(t.num_layers)]
    assert kept.tolist() == expected


# -- merge groups ---------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [0, 2])
def test_groups_colour_each_position_by_its_trace_group(traces, layer):
    t = traces["elastic"]
    lt = t.layers[layer]
    fig = viz.merge_groups(t, layer=layer, step=0)
    bars = data(fig, "prompt")
    custom = arr(bars["customdata"])
    assert custom[:, 0].tolist() == list(range(t.prompt_length))
    assert custom[:, 1].tolist() == lt.group.tolist()
    colours = bars["marker"]["color"]
    # Same group -> same colour, neighbouring groups -> different colours.
    for p, g in enumerate(lt.group):
        assert colours[p] == colours[g]
    anchors_in_order = lt.kept
    for a, b in zip(anchors_in_order[:-1], anchors_in_order[1:]):
        assert colours[a] != colours[b]
    # Groups read as alternating bands of a few tones, explained in the legend.
    assert len({colours[int(p)] for p in lt.kept}) <= 3
    assert "one colour band = one merge group" in names(fig)


def test_groups_of_a_method_that_does_not_merge_take_one_tone(traces):
    t = traces["h2o"]
    fig = viz.merge_groups(t, layer=0, step=0)
    colours = data(fig, "prompt")["marker"]["color"]
    assert len({colours[int(p)] for p in t.layers[0].kept}) == 1  # a light tone would read as evicted grey
    assert "one colour band = one merge group" not in names(fig) and "kept entry" in names(fig)


def test_groups_anchors_are_the_trace_kept_positions(traces):
    t = traces["elastic"]
    fig = viz.merge_groups(t, layer=1)
    anchors = arr(data(fig, "anchors")["x"]).tolist()
    assert anchors == [int(p) for p in t.layers[1].kept if p not in set(t.protected.tolist())]
    assert arr(data(fig, "protected")["x"]).tolist() == t.protected.tolist()
    assert arr(data(fig, "evicted at prefill")["x"]).tolist() == []  # elastic merges, never drops


def test_groups_show_h2o_prefill_evictions(traces):
    t = traces["h2o"]
    fig = viz.merge_groups(t, layer=0, step=0)
    assert arr(data(fig, "evicted at prefill")["x"]).tolist() == t.layers[0].evicted.tolist()
    assert arr(data(fig, "kept")["x"]).tolist() == t.layers[0].kept.tolist()


@pytest.mark.parametrize("step", [0, 5, NEW - 1])
def test_groups_replay_the_cache_at_a_step(traces, step):
    t = traces["elastic"]
    layer = 1
    fig = viz.merge_groups(t, layer=layer, step=step)
    held = t.positions_at(layer, step)
    group = t.layers[layer].group
    gone = [p for p in range(t.prompt_length) if group[p] not in held]
    assert arr(data(fig, "removed while decoding")["x"]).tolist() == gone
    colours = data(fig, "prompt")["marker"]["color"]
    assert [p for p, c in enumerate(colours) if c == viz.groups.DROPPED_FILL] == gone
    fed = list(range(t.prompt_length, t.prompt_length + step))
    assert arr(data(fig, "generated (held)")["x"]).tolist() == [p for p in fed if p in held]
    assert arr(data(fig, "generated (removed)")["x"]).tolist() == [p for p in fed if p not in held]
    if step == 0:
        assert gone == []


def test_groups_hover_shows_token_text_escaped(traces):
    t = traces["elastic"]
    bars = data(viz.merge_groups(t, 0), "prompt")
    assert "'w&lt;5&gt;'" in bars["hovertext"][5]


# -- image overlay ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["elastic", "local"])
def test_image_overlay_has_one_cell_per_image_token(traces, image, method):
    t = traces[method]
    start, end = t.image_span
    fig = viz.image_overlay(t, image, layer=1)
    cells = data(fig, "patches")
    assert arr(cells["z"]).shape == (8, 8)
    custom = arr(cells["customdata"])
    assert custom[..., 0].ravel().tolist() == list(range(start, end))  # row-major patch order
    assert custom[..., 1].ravel().tolist() == t.layers[1].group[start:end].tolist()
    if t.layers[1].scores is not None:
        np.testing.assert_allclose(arr(cells["z"]).ravel(), np.log10(np.maximum(t.layers[1].scores[start:end], 1e-6)), rtol=1e-6)
    assert len(fig.layout.images) == 1


def test_image_overlay_marks_kept_and_removed_patches(traces, image):
    t = traces["elastic"]
    start, end = t.image_span
    step = t.decode_steps
    fig = viz.image_overlay(t, image, layer=0, step=step)
    kept = [int(p) for p in t.layers[0].kept if start <= p < end]
    marks = data(fig, "anchors")
    assert arr(marks["customdata"]).tolist() == kept
    assert arr(marks["x"]).tolist() == [(p - start) % 8 for p in kept]
    assert arr(marks["y"]).tolist() == [(p - start) // 8 for p in kept]
    held = t.positions_at(0, step)
    removed = [p for p in range(start, end) if t.layers[0].group[p] not in held]
    assert arr(data(fig, "removed while decoding")["customdata"]).tolist() == removed


def test_image_overlay_has_a_legend_entry_for_merged_patches(traces, image):
    t = traces["elastic"]
    start, end = t.image_span
    group = t.layers[1].group
    merged = [p for p in range(start, end) if group[p] >= 0 and group[p] != p]  # in another token's group
    assert merged, "budget 0.3 merges some image tokens"
    fig = viz.image_overlay(t, image, layer=1, step=0)
    assert arr(data(fig, "merged into an anchor")["customdata"]).tolist() == merged
    assert data(fig, "patches")["opacity"] <= 0.25  # the picture's own colours show through


def test_image_overlay_draws_the_picture_plotly_would_encode_for_each_image(traces, image):
    # The picture is encoded once per image (viz.image.picture_uri): it must be what plotly
    # itself makes of the fitted image, and each image its own.
    from _plotly_utils.basevalidators import ImageUriValidator
    from PIL import Image

    from viz.image import fit_image

    t = traces["elastic"]
    rows, cols = viz.image_grid(t)
    for picture in (image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), Image.new("RGB", (40, 30), "red")):
        for _ in range(2):  # drawn afresh, then from the kept encoding
            fig = viz.image_overlay(t, picture, layer=0)
            expected = ImageUriValidator.pil_image_to_uri(fit_image(picture, rows, cols))
            assert fig.layout.images[0].source == expected


def test_layer_axes_and_labels_show_the_decoder_index(traces, image):
    """A hybrid model traces only its full-attention layers: traced layer l is decoder layer
    ``trace.layer_ids[l]`` on every axis and label."""
    t = dataclasses.replace(traces["elastic"], layer_ids=[1, 3, 5])
    heat = viz.attention_heatmap(t, layer=1)
    frame = next(s for s in heat.layout.shapes if s.name == "chosen layer")
    axis = heat.layout[frame.yref.replace("y", "yaxis")]
    ticks = dict(zip(axis.tickvals, axis.ticktext))
    assert ticks[1] == "<b>3 \u2192</b>" and all(str([1, 3, 5][v]) in text for v, text in ticks.items())
    assert data(heat, "scores")["text"][2][0].startswith("layer 5, position 0 ")
    assert viz.merge_groups(t, 1).layout.title.text.startswith("Layer 3, ")
    assert viz.cache_timeline(t, 2).layout.title.text.startswith("Layer 5, ")
    assert viz.image_overlay(t, image, 0).layout.title.text.startswith("Image tokens, layer 1, ")
    budgets = viz.layer_budgets_figure(t, layer=0)
    assert list(budgets.layout.xaxis.ticktext) == ["1", "3", "5"] and list(budgets.layout.xaxis.tickvals) == [0, 1, 2]
    assert "layer 5</b>" in data(budgets, "Elastic Cache")["hovertext"][2]
    # Without the attribute (an older trace): 0 .. L-1.
    import types

    assert viz.style.layer_ids(types.SimpleNamespace(num_layers=3)) == [0, 1, 2]
    plain = viz.attention_heatmap(traces["elastic"], layer=0)
    assert "layer %{y}" in data(plain, "scores")["hovertemplate"]  # one label row for all layers, as before


# -- legible from the back of a room (issue 32): fonts >= 14 px, WCAG AA contrast on both themes --
# gradio 6.31's page behind a figure: white (light theme; Soft's blocks are white too) and, in the
# dark theme, the page (neutral_950) and a block (Soft's block_background_fill_dark, neutral_800).
LIGHT_PAGES, DARK_PAGES = ["#ffffff", "#f9fafb"], ["#0b0f19", "#1f2937"]
NAMED = {"white": (255, 255, 255, 1.0), "black": (0, 0, 0, 1.0), "transparent": (0, 0, 0, 0.0)}


def rgba(colour):
    """``(r, g, b, alpha)`` of a CSS colour as plotly writes them."""
    colour = colour.strip().lower()
    if colour in NAMED:
        return NAMED[colour]
    if colour.startswith("#"):
        h = colour[1:]
        if len(h) == 3:
            h = "".join(c * 2 for c in h)
        return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16), 1.0
    parts = [float(v) for v in colour[colour.index("(") + 1:colour.index(")")].split(",")]
    return parts[0], parts[1], parts[2], parts[3] if len(parts) == 4 else 1.0


def over(top, bottom):
    """``top`` composited over the opaque ``bottom`` (alpha blending, as the browser paints)."""
    r, g, b, a = rgba(top)
    R, G, B, _ = rgba(bottom)
    return f"rgb({r * a + R * (1 - a)}, {g * a + G * (1 - a)}, {b * a + B * (1 - a)})"


def contrast(fg, bg):
    """WCAG 2.x contrast ratio of two opaque colours."""
    def lum(colour):
        chans = [c / 255 for c in rgba(colour)[:3]]
        chans = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in chans]
        return 0.2126 * chans[0] + 0.7152 * chans[1] + 0.0722 * chans[2]
    hi, lo = sorted((lum(fg), lum(bg)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def texts(fig):
    """Every piece of text a figure draws: ``(where, size px, colour, background or None)``.

    Read from the figure's JSON (what the browser gets) and resolved as plotly.js resolves
    it: the element's own font, then the template's, then the layout font (axis titles
    1.2x, the title 1.4x of it), then plotly's defaults (12 px, #444; hover labels 13 px).
    A background of None means the figure's paper."""
    spec = json.loads(fig.to_json())
    L, TL = spec["layout"], get(spec, "layout", "template", "layout") or {}
    TD = get(spec, "layout", "template", "data") or {}

    def font(own, tpl, size, colour):
        return (get(own, "size") or get(tpl, "size") or size, get(own, "color") or get(tpl, "color") or colour)

    base = font(L.get("font"), TL.get("font"), 12, "#444")
    out = []
    if get(L, "title", "text"):
        out.append(("title", *font(get(L, "title", "font"), get(TL, "title", "font"), round(base[0] * 1.4), base[1]),
                    None))
    if get(L, "title", "subtitle", "text"):
        title_size = font(get(L, "title", "font"), get(TL, "title", "font"), round(base[0] * 1.4), base[1])[0]
        out.append(("subtitle", *font(get(L, "title", "subtitle", "font"), get(TL, "title", "subtitle", "font"),
                                      round(title_size * 0.7), base[1]), None))
    for key, axis in L.items():
        if not (key.startswith("xaxis") or key.startswith("yaxis")) or axis.get("visible") is False:
            continue
        tpl = TL.get(key[:5], {})
        if axis.get("showticklabels", True):
            out.append((f"{key} ticks", *font(axis.get("tickfont"), tpl.get("tickfont"), *base), None))
        if get(axis, "title", "text"):
            out.append((f"{key} title", *font(get(axis, "title", "font"), get(tpl, "title", "font"),
                                             round(base[0] * 1.2), base[1]), None))
    if any(t.get("showlegend", True) is not False for t in spec["data"]) and L.get("showlegend", True):
        out.append(("legend", *font(get(L, "legend", "font"), get(TL, "legend", "font"), *base), None))
    for a in L.get("annotations", []):
        out.append((f"annotation {a.get('text')!r}", *font(a.get("font"), get(TL, "annotationdefaults", "font"), *base),
                    a.get("bgcolor")))
    hover = font(get(L, "hoverlabel", "font"), get(TL, "hoverlabel", "font"), 13, None)
    hover_bg = get(L, "hoverlabel", "bgcolor") or get(TL, "hoverlabel", "bgcolor")
    for t in spec["data"]:
        own = font(get(t, "hoverlabel", "font"), None, *hover)
        out.append((f"hover of {t.get('name')}", *own, get(t, "hoverlabel", "bgcolor") or hover_bg or "unset"))
        tpl = (TD.get(t.get("type", "scatter")) or [{}])[0]
        if "colorbar" in t and t.get("showscale", True) is not False:
            out.append((f"colour bar ticks of {t.get('name')}",
                        *font(get(t, "colorbar", "tickfont"), get(tpl, "colorbar", "tickfont"), *base), None))
            if get(t, "colorbar", "title", "text"):
                out.append((f"colour bar title of {t.get('name')}",
                            *font(get(t, "colorbar", "title", "font"), get(tpl, "colorbar", "title", "font"), *base),
                            None))
        if t.get("texttemplate") or "text" in (t.get("mode") or "") or (
                t.get("type") == "bar" and t.get("text") is not None and t.get("textposition") != "none"):
            out.append((f"text of {t.get('name')}", *font(t.get("textfont"), get(tpl, "textfont"), *base), None))
    return L, TL, out


def all_figures(traces, layered, image):
    """One of every figure ``viz`` exports, from real traces: each method kind, with and
    without a chosen layer, a budget per layer, Compare's figures, the empty states."""
    t = traces["elastic"]
    return {
        "heatmap": viz.attention_heatmap(t), "heatmap, layer 1": viz.attention_heatmap(t, layer=1),
        "heatmap, no scores": viz.attention_heatmap(traces["local"], layer=0),
        "heatmap, per layer": viz.attention_heatmap(layered["vlcache"], layer=2),
        "groups": viz.merge_groups(t, 1, 5), "groups, h2o": viz.merge_groups(traces["h2o"], 0),
        "overlay": viz.image_overlay(t, image, 1), "overlay, no scores": viz.image_overlay(traces["local"], image, 0),
        "overlay, no image tokens": viz.image_overlay(dataclasses.replace(t, spans={"instruction": (0, T)},
                                                                          image_grid=None)),
        "timeline": viz.cache_timeline(t, 1, 4), "timeline, per layer": viz.cache_timeline(layered["prefixkv"], 2),
        "lengths": viz.lengths_figure(traces), "budgets": viz.layer_budgets_figure(layered, layer=1),
        "budgets, one": viz.layer_budgets_figure(t, layer=0),
        "message": viz.message_figure("nothing yet"), "message, titled": viz.message_figure("nothing", "A title"),
    }


def test_every_exported_figure_is_checked(traces, layered, image):
    # A figure function added to viz without a place in all_figures fails here.
    import inspect

    exported = {n for n in viz.__all__ if inspect.signature(getattr(viz, n)).return_annotation in ("go.Figure",)}
    assert exported == {"attention_heatmap", "merge_groups", "image_overlay", "cache_timeline", "lengths_figure",
                        "layer_budgets_figure", "message_figure"}
    assert len(all_figures(traces, layered, image)) == 16


def test_every_figure_reads_from_the_back_of_a_room(traces, layered, image):
    """Issue 32: every text >= 14 px (titles >= 18), and >= 4.5:1 (WCAG AA) against what is
    behind it on gradio's light page and on its dark page alike."""
    for label, fig in all_figures(traces, layered, image).items():
        L, TL, found = texts(fig)
        assert found, label
        paper = L.get("paper_bgcolor") or TL.get("paper_bgcolor") or "#ffffff"
        plot = L.get("plot_bgcolor") or TL.get("plot_bgcolor") or "#ffffff"
        for where, size, colour, background in found:
            assert size >= 14, f"{label}: {where} is {size} px"
            if where in ("title",):
                assert size >= 18, f"{label}: the title is {size} px"
            assert colour is not None, f"{label}: {where} has no colour of its own (plotly picks one per trace)"
            assert background != "unset", f"{label}: {where} has no background of its own"
            for page in LIGHT_PAGES + DARK_PAGES:
                # Text sits on the paper, or on the plot area, or on its own box; each over the page.
                behind = [over(paper, page), over(over(plot, over(paper, page)), page)]
                if background is not None:
                    behind = [over(background, b) for b in behind]
                for bg in behind:
                    ratio = contrast(over(colour, bg), bg)
                    assert ratio >= 4.5, f"{label}: {where} ({colour} on {bg}, page {page}) has contrast {ratio:.2f}"
        # No <sup>/<sub>/<small>: plotly draws them at 70% of the font size.
        strings = json.dumps(json.loads(fig.to_json())["layout"]) + json.dumps(json.loads(fig.to_json())["data"])
        assert not any(tag in strings for tag in ("<sup>", "<sub>", "<small>")), label


def test_no_toolbar_over_a_title(traces, layered, image):
    """plotly's modebar stands at the top right on hover: a vertical one in a right margin that
    holds nothing else never covers the title (the browser test measures it on screen)."""
    for label, fig in all_figures(traces, layered, image).items():
        spec = json.loads(fig.to_json())
        L, TL = spec["layout"], spec["layout"]["template"]["layout"]
        assert (get(L, "modebar", "orientation") or get(TL, "modebar", "orientation")) == "v", label
        assert get(L, "margin", "r") >= 40, label
        assert get(L, "legend", "orientation") == "h" or not any(t.get("showlegend", True) for t in spec["data"]), label
        for t in spec["data"]:  # a colour bar right of the plot would stand under the toolbar
            if "colorbar" in t and t.get("showscale", True) is not False and t.get("type") == "heatmap" \
                    and label.startswith("heatmap"):
                assert get(t, "colorbar", "orientation") == "h", label
        if get(L, "title", "text"):
            assert get(L, "title", "xanchor") == "left" and get(L, "title", "x") == 0, label


def test_image_overlay_without_image_or_grid(traces):
    t = traces["elastic"]
    assert len(viz.image_overlay(t, None).layout.images) == 0
    import dataclasses

    no_image = dataclasses.replace(t, spans={"instruction": (0, t.prompt_length)}, image_grid=None)
    fig = viz.image_overlay(no_image)
    assert len(fig.data) == 0 and "no image" in fig.layout.annotations[0].text
    wrong_grid = dataclasses.replace(t, image_grid=(4, 4))  # 16 != 64 image tokens: square fallback
    assert viz.image_grid(wrong_grid) == (8, 8)


# -- timeline -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["elastic", "h2o", "full"])
def test_timeline_is_the_trace_lengths_and_evictions(traces, method):
    t = traces[method]
    layer = 2
    fig = viz.cache_timeline(t, layer=layer, step=3)
    assert arr(data(fig, "cache length")["y"]).tolist() == list(t.lengths)
    assert arr(data(fig, "full cache")["y"]).tolist() == t.full_lengths().tolist()
    ev = data(fig, "evictions")
    rows = [r for r in t.evictions_of(layer).tolist() if r[0] <= 3]  # replaying step 3: evictions so far
    assert arr(ev["x"]).tolist() == [r[0] for r in rows]
    assert arr(ev["customdata"]).tolist() == [r[1] for r in rows]
    # A rug on the plot's floor: no eviction marker sits on the length line.
    assert set(arr(ev["y"]).tolist()) <= {0} and ev["cliponaxis"] is False
    assert all(t.lengths[s] > 0 for s, _ in rows)
    full_bytes = t.full_lengths() * t.bytes_per_entry
    unit = next(u for u, size in (("MiB", 2 ** 20), ("KiB", 2 ** 10), ("B", 1)) if full_bytes.max() >= size)
    size = {"MiB": 2 ** 20, "KiB": 2 ** 10, "B": 1}[unit]
    np.testing.assert_allclose(arr(data(fig, "KV bytes")["y"]), t.kv_bytes() / size)
    np.testing.assert_allclose(arr(data(fig, "full KV bytes")["y"]), full_bytes / size)
    assert fig.layout.yaxis2.title.text == f"KV ({unit})" and unit in data(fig, "KV bytes")["hovertemplate"]
    assert f" {unit} kept vs " in heading(fig) and "bytes" not in heading(fig)
    hlines = [s.y0 for s in fig.layout.shapes if s.type == "line" and s.y0 == s.y1]
    if t.fixed_point is None:
        assert hlines == []
    else:
        assert hlines == [t.fixed_point]
    vlines = [s.x0 for s in fig.layout.shapes if s.type == "line" and s.x0 == s.x1]
    assert vlines == [3, 3]


def test_step_is_clipped(traces):
    t = traces["elastic"]
    fig = viz.cache_timeline(t, step=10_000)
    assert f"step {t.decode_steps}:" in fig.layout.title.text


# -- text -----------------------------------------------------------------------------------------
def test_diff_tokens_marks_changed_and_missing_words():
    diff = viz.diff_tokens("a red circle top left", "a blue circle left")
    assert diff == [("same", "a"), ("missing", "red"), ("changed", "blue"), ("same", "circle"),
                    ("missing", "top"), ("same", "left")]
    assert viz.diff_tokens("same words", "same words") == [("same", "same"), ("same", "words")]


def test_compare_html_shows_answers_and_metrics():
    stats = {"prefill_s": 0.5, "decode_s": 1.5, "tokens_per_s": 12.0, "kv_bytes": 300, "full_kv_bytes": 1000}
    html = viz.compare_html([
        {"method": "full", "text": "a red <circle>", "stats": {**stats, "kv_bytes": 1000}},
        {"method": "elastic", "text": "a blue <circle>", "stats": stats, "rouge_l": 0.6667},
    ], budget=0.3)
    assert "Full cache" in html and "Elastic Cache" in html
    assert "&lt;circle&gt;" in html and "<circle>" not in html  # answers are escaped
    elastic_cell = html[html.index('data-method="elastic"'):]
    plain, diff = elastic_cell.split("<details", 1)
    assert "a blue &lt;circle&gt;" in plain and "<mark" not in plain  # the answer as written first
    assert f'<mark class="ec-changed" style="{viz.text.CHANGED}">blue</mark>' in diff  # the diff behind a toggle
    assert f'<del class="ec-missing" style="{viz.text.MISSING}">red</del>' in diff
    assert "<details" not in html[:html.index('data-method="elastic"')]  # none for the reference
    assert "0.667" in html and "2.00 s" in html and "12.0" in html and "30% of full" in html
    same = viz.compare_html([{"method": "full", "text": "x", "stats": stats},
                             {"method": "h2o", "text": "x", "stats": {**stats, "median_tokens_per_s": 20.0}}])
    assert "<details" not in same and "20.0" in same  # the median step's speed when present


def test_diff_colours_are_readable_on_light_and_dark_pages():
    def luminance(hex_colour):
        rgb = [int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
        rgb = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
        return 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]

    def contrast(a, b):
        hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
        return (hi + 0.05) / (lo + 0.05)

    colour = dict(part.split(":") for part in viz.text.CHANGED.split(";"))
    assert contrast(colour["color"], colour["background"]) >= 7  # text on its own highlight
    missing = dict(part.split(":") for part in viz.text.MISSING.split(";"))["color"]
    for page in ("#ffffff", "#0b0f19"):  # gradio's light and dark backgrounds
        assert contrast(missing, page) >= 3.0


def test_explain_html_uses_the_trace_numbers(traces):
    t = traces["elastic"]
    text = viz.explain_html(t, layer=1)
    assert f"= {t.fixed_point}" in text and f"= {len(t.layers[1].kept)} entries" in text
    assert f"{len(t.evictions_of(1))} deletions" in text
    assert "H2O" in viz.explain_html(traces["h2o"])
    assert "Send a message" in viz.explain_html(None)


def test_explain_html_states_the_clamped_numbers():
    """The numbers come from the trace and the budget rule, also when the minimum or the
    fixed point's clamp applied (hand-computed for T = 90)."""
    model = elastic.attach(tiny_llama(layers=2, sharpness=4.0))
    # budget 0.05, 16 sinks: ceil(0.05 * 90) = 5, but Elastic needs 16 + 1 (last token) + 1 = 18
    raised = _run(model, "elastic", budget=0.05, start_size=16, distance=-25)
    text = viz.explain_html(raised)
    assert len(raised.layers[0].kept) == 18 and raised.budget_entries == 5
    assert "&lceil;&gamma;&middot;T&rceil; = 5 entries, raised to the minimum of 18" in text
    # budget 0.2: ceil(0.2 * 90) = 18 entries; 18 + (-25) = -7 falls inside the sink, clamped to 1
    clamped = _run(model, "elastic", budget=0.2, distance=-25)
    text = viz.explain_html(clamped)
    assert clamped.fixed_point == 1 and "= -7, which would fall inside the attention sink" in text
    assert "clamped to 1" in text
    full = viz.explain_html(_run(model, "full"))
    assert "No scoring" in full and "does not measure attention" in full


def test_explain_html_counts_merged_instruction_tokens(traces):
    t = traces["elastic"]
    start, end = t.spans["instruction"]
    for layer in range(len(t.layers)):
        group = t.layers[layer].group
        # Independent count: instruction positions whose entry is another position's.
        merged = sum(1 for p in range(start, end) if group[p] >= 0 and group[p] != p)
        assert f"Here {merged} of the {end - start} instruction tokens were merged in layer {layer}." in \
            viz.explain_html(t, layer=layer)


def test_figures_serialise_to_json(traces, image):
    # gradio ships figures as JSON: NaN-free, plain JSON.
    for t in traces.values():
        for fig in (viz.attention_heatmap(t), viz.merge_groups(t, 0), viz.image_overlay(t, image, 0),
                    viz.cache_timeline(t, 0)):
            json.loads(fig.to_json())


def test_viz_imports_no_gradio_or_model_code():
    import subprocess
    import sys

    code = "import sys, viz; bad = [m for m in ('gradio', 'torch', 'transformers', 'elastic') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_summary_markdown_reads_the_trace(traces):
    t = traces["elastic"]
    stats = {"kv_bytes": int(t.kv_bytes()[-1]), "full_kv_bytes": int(t.full_lengths()[-1] * t.bytes_per_entry),
             "prefill_s": 0.1, "tokens_per_s": float("nan"), "new_tokens": NEW}
    md = viz.summary_markdown(t, stats, ["careful"])
    assert f"{t.lengths[-1]} of {t.full_lengths()[-1]} KV entries" in md
    assert "n/a tokens/s" in md and md.endswith("⚠️ careful")


# -- budgets per layer (PrefixKV, VL-Cache) ---------------------------------------------------------
def kept_count(trace, layer):
    """Independent count: the prompt positions that hold themselves after the prefill."""
    group = trace.layers[layer].group
    return int(sum(1 for p, g in enumerate(group.tolist()) if g == p))


def test_layered_fixture_has_uneven_budgets(layered):
    # The per-layer checks below mean little unless the layers really kept different numbers.
    for key in ("prefixkv", "prefixkv-ratios", "vlcache"):
        t = layered[key]
        counts = [kept_count(t, l) for l in range(t.num_layers)]
        assert t.budgets_per_layer and len(set(counts)) > 1, (key, counts)
        assert sum(counts) == math.ceil(Fraction(3, 10) * t.num_layers * T)  # all layers: budget x the full cache
    assert layered["prefixkv-ratios"].fixed_point is not None and len(layered["vlcache"].evictions) > 0
    assert not layered["lookm"].budgets_per_layer and layered["lookm"].per_head
    # A mean over layers of different lengths is not a whole number.
    assert any(not float(v).is_integer() for v in layered["vlcache"].lengths)


@pytest.mark.parametrize("key", LAYERED)
def test_layer_budgets_bars_are_the_entries_each_layer_kept(layered, key):
    t = layered[key]
    fig = viz.layer_budgets_figure(t)
    bars = data(fig, viz.method_name(t.method))
    assert bars["type"] == "bar" and arr(bars["x"]).tolist() == list(range(t.num_layers))
    y = arr(bars["y"]).tolist()
    assert y == t.layer_budget_entries().tolist()  # the library's budget entries per layer
    assert y == [kept_count(t, l) for l in range(t.num_layers)]  # counted from the groups
    assert y == [len(lt.kept) for lt in t.layers] == t.layer_lengths[0].tolist()  # the cache's lengths
    custom = arr(bars["customdata"])
    np.testing.assert_allclose(custom[:, 0], [lt.budget for lt in t.layers])
    assert custom[:, 1].tolist() == [lt.budget_entries for lt in t.layers]
    if t.budgets_per_layer:
        np.testing.assert_allclose(custom[:, 0] * T, y)  # a layer's ratio is k_l / T
        assert "own budget" in bars["hovertext"][0]
    else:
        assert y == [T if t.method == "full" else UNIFORM] * t.num_layers
    line = data(fig, "uniform budget")
    assert arr(line["y"]).tolist() == [T if t.method == "full" else UNIFORM] * 2
    assert fig.layout.xaxis.title.text == "layer" and "entries kept" in fig.layout.yaxis.title.text


def test_layer_budgets_compare_has_one_series_per_method(layered):
    traces = {m: layered[k] for m, k in (("full", "full"), ("elastic", "elastic"), ("prefixkv", "prefixkv-ratios"),
                                         ("vlcache", "vlcache"), ("lookm", "lookm"))}
    fig = viz.layer_budgets_figure(traces, layer=2)
    assert names(fig) == ["Elastic Cache", "PrefixKV", "VL-Cache", "LOOK-M", "uniform budget"]  # full left out
    assert fig.layout.barmode == "group"
    for method, t in traces.items():
        if method != "full":
            assert arr(data(fig, viz.method_name(method))["y"]).tolist() == [kept_count(t, l) for l in range(3)]
    assert arr(data(fig, "uniform budget")["y"]).tolist() == [UNIFORM, UNIFORM]
    selected = [s for s in fig.layout.shapes if s.name == "selected layer"]
    assert len(selected) == 1 and (selected[0].x0, selected[0].x1) == (1.5, 2.5)
    # The title names the layers that keep most and least, from the counts.
    counts = [kept_count(traces["prefixkv"], l) for l in range(3)]
    most, least = int(np.argmax(counts)), int(np.argmin(counts))
    assert (f"PrefixKV: layer {most} keeps most ({max(counts)}), layer {least} least ({min(counts)}), "
            f"{sum(counts)} in all (the uniform budget: 3 &times; {UNIFORM} = {3 * UNIFORM})") in heading(fig)
    assert "VL-Cache: layer" in heading(fig) and "Elastic" not in heading(fig)
    # The full cache alone is drawn (every layer keeps everything).
    alone = viz.layer_budgets_figure({"full": layered["full"]})
    assert arr(data(alone, "Full cache")["y"]).tolist() == [T] * 3


@pytest.mark.parametrize("key", ["prefixkv-ratios", "vlcache"])
def test_heatmap_shows_each_layers_own_budget(layered, key):
    t = layered[key]
    fig = viz.attention_heatmap(t, layer=1)
    side = data(fig, "layer budget")
    heat = data(fig, "scores")
    assert side["orientation"] == "h" and side["yaxis"] != heat["yaxis"] and side["xaxis"] != heat["xaxis"]
    assert arr(side["y"]).tolist() == list(range(t.num_layers))
    assert arr(side["x"]).tolist() == [kept_count(t, l) for l in range(t.num_layers)]
    np.testing.assert_allclose(arr(side["customdata"])[:, 0], [lt.budget for lt in t.layers])
    assert arr(data(fig, "uniform budget")["x"]).tolist() == [UNIFORM, UNIFORM]
    colours = side["marker"]["color"]
    assert [c for i, c in enumerate(colours) if i != 1] == [colours[0]] * 2 and colours[1] != colours[0]  # layer 1
    counts = [kept_count(t, l) for l in range(t.num_layers)]
    assert f"each layer its own budget, {min(counts)} to {max(counts)} of {T} entries" in heading(fig)
    # The heatmap itself is unchanged: the score matrix, the chosen layer's kept positions.
    np.testing.assert_allclose(arr(data(fig, "scores")["customdata"]), t.scores_matrix(), rtol=1e-6)
    protected = set(t.protected.tolist())
    assert arr(data(fig, "kept")["x"]).tolist() == [int(p) for p in t.layers[1].kept if p not in protected]


@pytest.mark.parametrize("key", ["elastic", "lookm"])
def test_heatmap_of_a_uniform_budget_says_so(layered, key):
    fig = viz.attention_heatmap(layered[key])
    assert "layer budget" not in names(fig)
    assert f"every layer keeps {UNIFORM} of {T} entries" in heading(fig)


@pytest.mark.parametrize("key", ["prefixkv-ratios", "vlcache", "elastic"])
@pytest.mark.parametrize("layer", [0, 2])
def test_timeline_follows_the_layers_own_length(layered, key, layer):
    t = layered[key]
    fig = viz.cache_timeline(t, layer=layer, step=NEW - 1)
    replayed = [len(t.positions_at(layer, s)) for s in range(t.decode_steps + 1)]  # independent of lengths
    assert arr(data(fig, "cache length")["y"]).tolist() == replayed == t.lengths_of(layer).tolist()
    budget = data(fig, "layer budget")
    assert arr(budget["x"]).tolist() == [0] and arr(budget["y"]).tolist() == [kept_count(t, layer)]
    np.testing.assert_allclose(arr(budget["customdata"])[0], [t.layers[layer].budget])
    ev = data(fig, "evictions")
    assert [f"layer {layer} then holds {replayed[s]} entries" in h for s, h in zip(arr(ev["x"]).tolist(), ev["hovertext"])] \
        == [True] * len(ev["hovertext"])
    if t.budgets_per_layer:
        mean = [np.mean([len(t.positions_at(l, s)) for l in range(t.num_layers)]) for s in range(len(replayed))]
        np.testing.assert_allclose(arr(data(fig, "mean over layers")["y"]), mean)
        assert f"{replayed[NEW - 1]} entries (its own budget)" in heading(fig)
        assert f"Layer {layer}, step {NEW - 1}" in fig.layout.title.text
        assert fig.layout.yaxis.title.text == f"entries in layer {layer}"
    else:
        assert "mean over layers" not in names(fig)
        assert fig.layout.yaxis.title.text == f"entries in layer {layer}"


def test_timeline_draws_each_layers_own_n_tl(layered):
    # A PrefixKV layer that kept another number of prompt entries evicts at another slot:
    # N_tl = kept + distance (never a sink), the layer's own.
    t = layered["prefixkv-ratios"]
    def hlines(layer):
        fig = viz.cache_timeline(t, layer=layer)
        return [s.y0 for s in fig.layout.shapes if s.type == "line" and s.y0 == s.y1]
    assert kept_count(t, 0) != kept_count(t, 2)
    for layer in (0, 2):
        expected = max(min(t.start_size, t.prompt_length), kept_count(t, layer) + t.distance)
        assert hlines(layer) == [expected] == [t.layers[layer].fixed_point]
    assert t.fixed_point == t.layers[0].fixed_point


def test_lengths_figure_keeps_the_mean_over_layers(layered):
    fig = viz.lengths_figure({"vlcache": layered["vlcache"], "elastic": layered["elastic"]})
    t = layered["vlcache"]
    y = arr(data(fig, "VL-Cache")["y"])
    np.testing.assert_allclose(y, t.layer_lengths.mean(axis=1))  # not cut to whole entries
    assert any(not float(v).is_integer() for v in y)
    assert "mean over layers" in heading(fig)


def test_summary_and_explanation_of_a_budget_per_layer(layered):
    t = layered["vlcache"]
    final = float(np.mean([len(t.positions_at(l, t.decode_steps)) for l in range(3)]))
    stats = {"kv_bytes": int(t.kv_bytes()[-1]), "full_kv_bytes": int(t.full_lengths()[-1] * t.bytes_per_entry),
             "prefill_s": 0.1, "tokens_per_s": 5.0, "new_tokens": NEW}
    md = viz.summary_markdown(t, stats)
    assert f"{final:.1f} of {t.full_lengths()[-1]} KV entries per layer on average" in md
    assert "each layer has its own budget" in md
    counts = [kept_count(t, l) for l in range(3)]
    text = viz.explain_html(t, layer=2)
    assert "VL-Cache lets the text after the image vote" in text
    assert f"Layer 2's own budget is {counts[2] / T:.3f} of the prompt ({counts[2]} entries" in text
    assert f"kept {min(counts)} to {max(counts)} entries, {sum(counts)} in all" in text
    assert "A budget per layer" not in viz.explain_html(layered["lookm"], 0)
    assert "key is most similar" in viz.explain_html(layered["lookm"], 0)
    assert "PrefixKV scores the tokens" in viz.explain_html(layered["prefixkv"], 0)
    assert "most similar (cosine similarity)" in viz.explain_html(layered["elastic-similar"], 0)


def test_new_methods_have_names_and_every_figure_serialises(layered, image):
    assert [viz.method_name(m) for m in ("prefixkv", "vlcache", "lookm")] == ["PrefixKV", "VL-Cache", "LOOK-M"]
    assert all(viz.method_name(m) != m for m in elastic.METHODS)  # every registered method has a display name
    for t in layered.values():
        for layer in range(t.num_layers):
            for fig in (viz.attention_heatmap(t), viz.merge_groups(t, layer), viz.image_overlay(t, image, layer),
                        viz.cache_timeline(t, layer), viz.layer_budgets_figure(t, layer=layer)):
                json.loads(fig.to_json())
    json.loads(viz.layer_budgets_figure(layered).to_json())
