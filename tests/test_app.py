"""The app launched in-process and driven through ``gradio_client``.

Uses the shipped default model (SmolLM2 with eyes), as ``./run.sh app`` serves it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from collections import OrderedDict, deque
from contextlib import contextmanager
from fractions import Fraction
from html import unescape
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import app
import elastic
import viz
from explorer import guards, limits, runner, sessions
from test_viz import arr

ROOT = Path(__file__).resolve().parent.parent


def _model():
    return elastic.load_model(device="cpu")  # the default model, as the app serves it


@pytest.fixture(scope="module")
def server():
    model, processor = _model()
    app.MODEL.set(model, processor)
    app.serve(prevent_thread_lock=True, quiet=True)
    yield SimpleNamespace(url=app.demo.local_url, model=model)
    app.demo.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    red = Image.new("RGB", (64, 48), (250, 250, 250))
    red.paste((220, 30, 30), (4, 4, 30, 30))
    blue = Image.new("RGB", (48, 64), (15, 15, 15))
    blue.paste((30, 80, 235), (20, 30, 44, 60))
    paths = {"red": folder / "red.png", "blue": folder / "blue.jpg", "text": folder / "notes.txt",
             "corrupt": folder / "broken.png", "huge": folder / "huge.png"}
    red.save(paths["red"])
    blue.save(paths["blue"])
    paths["text"].write_text("this is not an image")
    paths["text_as_png"] = folder / "notes.png"
    paths["text_as_png"].write_text("this is not an image either")
    paths["corrupt"].write_bytes(paths["red"].read_bytes()[:60])  # a PNG header, then nothing
    Image.new("RGB", (6000, 4000), (200, 200, 40)).save(paths["huge"])
    return paths


ABLATION = ("importance", "scope", "prefill", "decode", "protect")


def chat(client, image, text, history=(), method="elastic", budget=0.5, start_size=1, distance=-8,
         max_new_tokens=12, layer=0, **options):
    """Run /chat and return every yield; the last one is the final state, followed by what
    /panel (chained after /chat in the page) draws for it: chat, box, status, the seven
    panel outputs, the layer, step and head sliders. ``options`` are Elastic's ablation
    options (left out: the API's defaults)."""
    message = {"text": text, "files": [handle_file(str(image))] if image else []}
    extra = [options[k] for k in ABLATION[:max((ABLATION.index(k) + 1 for k in options), default=0)]]
    job = client.submit(message, resend(list(history)), method, budget, start_size, distance, max_new_tokens, layer,
                        *extra, api_name="/chat")
    job.result()
    outputs = job.outputs()
    return [*outputs[:-1], (*outputs[-1], *client.predict(layer, api_name="/panel"))]


def resend(history: list) -> list:
    """A chatbot value as gradio_client returns it, made fit to send back (files re-attached)."""
    def block(item):
        if item.get("type") == "file":
            return {"type": "file", "file": handle_file(item["file"])}
        return item
    return [{**m, "content": [block(c) for c in m["content"]]} for m in history]


@contextmanager
def endless(model):
    """Answers that run to the token limit (EOS switched off) while the block runs."""
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        yield
    finally:
        model.generation_config.eos_token_id = eos


def wait_until(condition, seconds: float) -> bool:
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.05)
    return condition()


def figure(output) -> dict:
    """A gr.Plot output as the browser gets it (plotly JSON)."""
    return json.loads(output["plot"])


def trace_data(fig: dict, name: str) -> dict:
    return next(t for t in fig["data"] if t.get("name") == name)


def session_trace(client) -> elastic.Trace:
    return app.SESSIONS[client.session_hash].trace


# -- chat -----------------------------------------------------------------------------------------
def test_chat_streams_an_answer_and_draws_its_trace(server, images):
    client = Client(server.url, verbose=False)
    outputs = chat(client, images["red"], "what is in the image ?")
    assert len(outputs) >= 3  # "generating", at least one streamed chunk, the final state
    # Streamed messages carry the chat, the box and the status only (each extra output costs
    # the model time while it streams); the figures come from /panel afterwards.
    assert all(len(o) == 3 for o in outputs[:-1]) and len(outputs[-1]) == 3 + 11
    history, _, status, heat, groups, overlay, timeline, explain, *_teach, layer, step, _head = outputs[-1]
    answer = history[-1]
    assert answer["role"] == "assistant" and answer["content"][0]["text"].strip()
    assert "KV entries" in status
    trace = session_trace(client)
    assert trace.method == "elastic" and step["value"] == trace.decode_steps == step["maximum"]
    heat = figure(heat)
    np.testing.assert_allclose(arr(trace_data(heat, "scores")["customdata"]), trace.scores_matrix(), rtol=1e-6)
    assert trace_data(figure(timeline), "cache length")["y"] == list(trace.lengths)
    cells = trace_data(figure(overlay), "patches")
    start, end = trace.image_span
    assert np.asarray(cells["customdata"])[..., 0].size == end - start
    assert figure(overlay)["layout"]["images"]  # the uploaded image is drawn under the cells
    assert f"= {trace.fixed_point}" in explain


def test_second_turn_keeps_the_conversation(server, images):
    client = Client(server.url, verbose=False)
    first = chat(client, images["red"], "what colour ?")[-1][0]
    T1 = session_trace(client).prompt_length
    second = chat(client, None, "and the shape ?", history=first)[-1][0]
    assert second[: len(first)] == first and second[-1]["role"] == "assistant"
    assert session_trace(client).prompt_length > T1 + 3  # the first turn is in the prompt


def test_two_clients_get_their_own_traces(server, images):
    a, b = Client(server.url, verbose=False), Client(server.url, verbose=False)
    results = {}

    def run(name, client, image, method):
        results[name] = chat(client, images[image], "what is in the image ?", method=method, budget=0.3)[-1]

    threads = [threading.Thread(target=run, args=("a", a, "red", "elastic")),
               threading.Thread(target=run, args=("b", b, "blue", "h2o"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ta, tb = session_trace(a), session_trace(b)
    assert (ta.method, tb.method) == ("elastic", "h2o")
    for out, trace in ((results["a"], ta), (results["b"], tb)):
        timeline = figure(out[6])
        assert trace_data(timeline, "cache length")["y"] == list(trace.lengths)
        assert viz.method_name(trace.method) in figure(out[4])["layout"]["title"]["text"]
    assert figure(results["a"][5])["layout"]["images"] != figure(results["b"][5])["layout"]["images"]


def test_chat_runs_an_ablation_and_says_so(server, images):
    client = Client(server.url, verbose=False)
    out = chat(client, images["red"], "what is in the image ?", importance="debiased", scope="layer",
               prefill="evict", decode="recent", protect="instruction")[-1]
    trace = session_trace(client)
    assert trace.variant == {"importance": "debiased", "prefill": "evict", "decode": "recent", "protect": "instruction"}
    assert "importance=debiased" in out[2] and "Ablation" in out[7] and "evicts" in out[7]
    start, end = trace.spans["instruction"]
    assert all(set(range(start, end)) <= set(layer.kept.tolist()) for layer in trace.layers)
    assert all(len(layer.merged) == 0 for layer in trace.layers)  # evicted, not merged
    with pytest.raises(AppError, match="loudest is not in the list of choices"):  # gradio's own check
        chat(client, images["red"], "what ?", importance="loudest")


def test_chat_with_a_per_head_policy_shows_a_head_selector(server, images):
    client = Client(server.url, verbose=False)
    out = chat(client, images["red"], "what is in the image ?", method="snapkv", budget=0.3)[-1]
    trace = session_trace(client)
    head = out[-1]
    assert trace.per_head and head["visible"] and head["maximum"] == len(trace.heads) - 1
    heads = [trace.of_head(h) for h in range(len(trace.heads))]
    assert any(a.layers[0].kept.tolist() != heads[0].layers[0].kept.tolist() for a in heads[1:])
    layer = next(l for l in range(trace.num_layers)
                 if heads[1].layers[l].kept.tolist() != heads[0].layers[l].kept.tolist())
    session = app.SESSIONS[client.session_hash]
    steps = trace.decode_steps
    drawn = app.render_panel(session, layer, steps, head=1)[1]  # the groups figure, for KV head 1
    assert drawn.to_json() == viz.merge_groups(heads[1], layer, steps).to_json()
    assert drawn.to_json() != viz.merge_groups(heads[0], layer, steps).to_json()


def kept_counts(trace) -> list[int]:
    """Independent count of the entries each layer kept after the prefill: the prompt
    positions that hold themselves in the layer's groups."""
    return [int(sum(1 for p, g in enumerate(lt.group.tolist()) if g == p)) for lt in trace.layers]


def uniform_total(budget: float, layers: int, T: int) -> int:
    """All layers together keep ``ceil(budget * layers * T)`` entries: ``budget x`` the full
    cache's (exact arithmetic)."""
    return math.ceil(Fraction(str(budget)) * layers * T)


@pytest.mark.parametrize("method", ["prefixkv", "vlcache", "lookm"])
def test_chat_runs_each_new_method_with_its_budget_per_layer(server, images, method):
    client = Client(server.url, verbose=False)
    layer = 1  # the slider's range before an answer is 0..1
    out = chat(client, images["red"], "what is in the image ?", method=method, budget=0.3, max_new_tokens=6,
               layer=layer)[-1]
    history, _, status, heat, _, _, timeline, explain, _, _, budgets, layer_slider, _, head = out
    assert history[-1]["role"] == "assistant" and "KV entries" in status
    trace = session_trace(client)
    assert trace.method == method and layer_slider["value"] == layer
    assert viz.method_name(method) in explain
    counts = kept_counts(trace)
    # The budget per layer: one bar per layer, the entries it kept, the chosen layer outlined.
    budgets = figure(budgets)
    bars = trace_data(budgets, viz.method_name(method))
    assert arr(bars["y"]).tolist() == counts == trace.layer_lengths[0].tolist() == \
        trace.layer_budget_entries().tolist()
    assert [(s["x0"], s["x1"]) for s in budgets["layout"]["shapes"] if s.get("name") == "selected layer"] == \
        [(layer - 0.5, layer + 0.5)]
    # The timeline follows the chosen layer's own length (replayed from the trace).
    replayed = [len(trace.positions_at(layer, s)) for s in range(trace.decode_steps + 1)]
    assert arr(trace_data(figure(timeline), "cache length")["y"]).tolist() == replayed
    assert arr(trace_data(figure(timeline), "layer budget")["y"]).tolist() == [counts[layer]]
    heat = figure(heat)
    if method == "lookm":  # one budget for all layers, one selection per KV head
        assert not trace.budgets_per_layer and trace.per_head and head["visible"]
        assert counts == [math.ceil(Fraction(3, 10) * trace.prompt_length)] * trace.num_layers
        assert all(t.get("name") != "layer budget" for t in heat["data"])
    else:  # a real model's layers attend differently: their budgets differ
        assert trace.budgets_per_layer and len(set(counts)) > 1
        assert sum(counts) == uniform_total(0.3, trace.num_layers, trace.prompt_length)
        assert arr(trace_data(heat, "layer budget")["x"]).tolist() == counts
        assert "A budget per layer" in explain and "on average" in status


def test_the_method_menus_offer_every_policy(server):
    config = app.demo.get_config_file()
    def choices(elem_id):
        component = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id)
        return [value for _, value in component["props"]["choices"]], component["props"]["value"]
    explore, default = choices("method")
    assert explore == list(elastic.METHODS) and {"prefixkv", "vlcache", "lookm"} <= set(explore)
    assert default == app.DEFAULT_METHOD
    compare, ticked = choices("compare-methods")
    assert compare == [m for m in elastic.METHODS if m != "full"] and {"prefixkv", "vlcache", "lookm"} <= set(compare)
    assert ticked == ["elastic", "h2o"]  # the defaults stay two quick methods


def test_compare_runs_the_new_methods_with_their_budgets_per_layer(server, images):
    client = Client(server.url, verbose=False)
    _, payload, lengths, budgets = client.predict(handle_file(str(images["red"])), "what colour ?", 0.3, 4,
                                                  ["lookm", "vlcache", "prefixkv"], api_name="/compare")
    assert list(payload["answers"]) == ["full", "prefixkv", "vlcache", "lookm"]
    assert all(payload["answers"][m].strip() for m in payload["answers"])
    budgets = figure(budgets)
    assert [t["name"] for t in budgets["data"]] == ["PrefixKV", "VL-Cache", "LOOK-M", "uniform budget"]
    T = payload["metrics"]["full"]["prompt_tokens"]
    picture = elastic.load_image(str(images["red"]))
    for method in ("prefixkv", "vlcache", "lookm"):
        drawn = arr(trace_data(budgets, viz.method_name(method))["y"]).tolist()
        if method == "lookm":  # the same budget in every layer
            assert drawn == [math.ceil(Fraction(3, 10) * T)] * len(drawn)
        else:  # a budget per layer, all layers together budget x the full cache
            assert sum(drawn) == uniform_total(0.3, len(drawn), T)
        # The same prefill run directly through the library keeps the same entries per layer.
        direct = elastic.generate(server.model, app.MODEL.processor, picture, "what colour ?", method=method,
                                  budget=0.3, max_new_tokens=1).trace
        assert drawn == kept_counts(direct)
        assert (len(set(drawn)) > 1) == (method != "lookm")
    assert arr(trace_data(budgets, "uniform budget")["y"]).tolist() == [math.ceil(Fraction(3, 10) * T)] * 2
    assert [t["name"] for t in figure(lengths)["data"]] == ["Full cache", "PrefixKV", "VL-Cache", "LOOK-M"]


def test_stop_ends_the_generation_and_keeps_what_was_written(server, images):
    client = Client(server.url, verbose=False)
    natural = chat(client, images["red"], "Describe the image in detail.", method="full", max_new_tokens=200)[-1]
    n_natural = session_trace(client).decode_steps
    message = {"text": "Describe the image in detail.", "files": [handle_file(str(images["red"]))]}
    job = client.submit(message, [], "full", 1.0, 1, -8, 200, 0, api_name="/chat")
    deadline = time.time() + 60
    while len(job.outputs()) < 3 and time.time() < deadline:  # "generating", then streamed text
        time.sleep(0.05)
    pressed = time.time()
    client.predict(api_name="/stop")
    final = job.result()
    assert time.time() - pressed < 2.0
    trace = session_trace(client)
    assert 1 <= trace.decode_steps < n_natural  # ended early, with the trace of what ran
    text = final[0][-1]["content"][0]["text"]
    assert text and natural[0][-1]["content"][0]["text"].startswith(text.strip()[:20])
    assert "Stopped after" in final[2]
    again = chat(client, images["red"], "Describe the image in detail.", method="full", max_new_tokens=200)[-1]
    assert session_trace(client).decode_steps == n_natural and "Stopped" not in again[2]  # the next one runs


def test_the_live_panel_follows_the_answer_while_it_streams(server, images):
    # What the page's timer asks for while the answer streams (/live): the prefill's figures
    # first, then the decoding views of later steps; each is checked against the final trace.
    client = Client(server.url, verbose=False)
    message = {"text": "Describe the image in detail.", "files": [handle_file(str(images["red"]))]}
    drawn = []  # (was the answer still streaming, /live's outputs)
    with endless(server.model):
        job = client.submit(message, [], "elastic", 0.5, 1, -8, 60, 0, api_name="/chat")
        while not job.done():
            out = client.predict(0, 0, api_name="/live")
            drawn.append((not job.done(), out))
            time.sleep(0.2)
        job.result()
    final = session_trace(client)
    plots = [(streaming, out) for streaming, out in drawn if isinstance(out[3], dict) and "plot" in out[3]]
    assert len(plots) >= 2 and all(streaming for streaming, _ in plots[:2]), "no live figures while streaming"
    first = plots[0][1]
    heat = figure(first[0])  # the prefill's figures: drawn once, from the first snapshot
    np.testing.assert_allclose(arr(trace_data(heat, "scores")["customdata"]), final.scores_matrix(), rtol=1e-6)
    steps = []
    for _, out in plots:
        lengths = arr(trace_data(figure(out[3]), "cache length")["y"]).tolist()
        assert lengths == list(final.lengths[:len(lengths)])  # the answer's cache, as far as it got
        steps.append(out[-2]["value"])
    assert steps == sorted(steps) and steps[-1] > steps[0] and steps[-1] <= final.decode_steps


def test_the_live_panel_draws_only_the_figure_tab_the_page_shows(server, images):
    # The page says which figure tab it shows: /live draws that tab's views only, its
    # decoding view on every new snapshot and its prefill view once; a tab chosen while the
    # answer streams gets its views at the next tick.
    from explorer.panel import PANEL

    client = Client(server.url, verbose=False)
    message = {"text": "Describe the image in detail.", "files": [handle_file(str(images["red"]))]}
    drawn = []  # (the tab shown, /live's figure outputs)
    with endless(server.model):
        job = client.submit(message, [], "elastic", 0.5, 1, -8, 120, 0, api_name="/chat")
        redraws = 0
        while not job.done() and redraws < 3:  # then the page switches to the Attention tab
            out = client.predict(0, 0, "timeline", api_name="/live")
            drawn.append(("timeline", out[:len(PANEL)]))
            redraws += any(isinstance(value, dict) and "plot" in value for value in out[:len(PANEL)])
            time.sleep(0.2)
        while not job.done() and len(drawn) < 30:
            out = client.predict(0, 0, "attention", api_name="/live")
            drawn.append(("attention", out[:len(PANEL)]))
            time.sleep(0.2)
        job.result()
    final = session_trace(client)
    is_plot = lambda value: isinstance(value, dict) and "plot" in value  # noqa: E731
    plotted = [(shown, {name for name, value in zip(PANEL, out) if is_plot(value)}) for shown, out in drawn]
    on_timeline = [names for shown, names in plotted if shown == "timeline" and names]
    assert len(on_timeline) >= 2, "the shown tab was not redrawn while the answer streamed"
    assert on_timeline[0] == {"timeline", "budgets"} and all(names == {"timeline"} for names in on_timeline[1:])
    for shown, out in drawn:
        if shown == "timeline" and is_plot(out[PANEL.index("timeline")]):
            lengths = arr(trace_data(figure(out[PANEL.index("timeline")]), "cache length")["y"]).tolist()
            assert lengths == list(final.lengths[:len(lengths)])
    on_attention = [names for shown, names in plotted if shown == "attention" and names]
    assert on_attention and on_attention[0] == {"heatmap"}, "the tab chosen while streaming was not drawn"
    assert all(not names for names in on_attention[1:]), "a prefill view was drawn twice"
    heat = figure(next(out for shown, out in drawn if shown == "attention" and is_plot(out[0]))[0])
    np.testing.assert_allclose(arr(trace_data(heat, "scores")["customdata"]), final.scores_matrix(), rtol=1e-6)


def test_a_tab_gets_its_own_views_and_no_others(server, images):
    # The teaching tab's copies are drawn once and sent only to it (not also to the hidden tabs).
    from explorer.panel import draw_views

    client = Client(server.url, verbose=False)
    chat(client, images["red"], "Describe the image.", method="elastic", budget=0.5, max_new_tokens=6)
    trace = session_trace(client)
    views = draw_views(("explain", "teach_groups", "teach_timeline"), trace, None, 1, 2)
    assert set(views) == {"explain", "teach_groups", "teach_timeline"}
    assert views["teach_groups"].to_json() == viz.merge_groups(trace, 1, 2).to_json()
    assert views["teach_timeline"].to_json() == viz.cache_timeline(trace, 1, 2).to_json()


def test_a_chat_whose_client_leaves_stops_generating(server, images):
    client = Client(server.url, verbose=False)
    message = {"text": "Describe the image in detail.", "files": [handle_file(str(images["red"]))]}
    with endless(server.model):  # it would run to 500 tokens (about 30 s)
        job = client.submit(message, [], "full", 1.0, 1, -8, 500, 0, api_name="/chat")
        wait_until(lambda: len(job.outputs()) >= 3, 60)
        assert app.GENERATING, "the generation should be running"
        job.cancel()  # what gradio does when a browser tab goes away
        assert wait_until(lambda: not app.GENERATING, 5), "the generation kept running after its client left"


# -- compare --------------------------------------------------------------------------------------
def test_compare_endpoint_returns_answers_and_metrics(server, images):
    client = Client(server.url, verbose=False)
    html, payload, lengths, budgets = client.predict(handle_file(str(images["red"])), "what is in the image ?", 0.3,
                                                     10, api_name="/compare")
    assert set(payload["answers"]) == {"full", "elastic", "h2o"}
    assert all(text.strip() for text in payload["answers"].values())
    metrics = payload["metrics"]
    assert metrics["full"]["rouge_l"] == 1.0
    for method in ("elastic", "h2o"):
        assert metrics[method]["rouge_l"] == pytest.approx(
            elastic.rouge_l(payload["answers"][method], payload["answers"]["full"]))
        assert metrics[method]["kv_bytes"] < metrics["full"]["kv_bytes"]
    assert html.count('class="ec-answer"') == 3 and "ROUGE-L" in html
    names = [t["name"] for t in figure(lengths)["data"]]
    assert names == ["Full cache", "Elastic Cache", "H2O"]
    # Entries kept per layer after the prefill: the full cache left out, the uniform budget drawn.
    bars = figure(budgets)["data"]
    assert [t["name"] for t in bars] == ["Elastic Cache", "H2O", "uniform budget"]
    T = metrics["full"]["prompt_tokens"]
    uniform = -(-3 * T // 10)  # ceil(0.3 * T), exactly
    assert all(arr(t["y"]).tolist() == [uniform] * len(arr(t["x"])) for t in bars[:2])


def test_compare_shows_each_answer_as_it_is_written(server, images):
    client = Client(server.url, verbose=False)
    with endless(server.model):  # every answer runs to the token limit
        job = client.submit(handle_file(str(images["red"])), "Describe the image.", 0.5, 30, ["h2o"],
                            api_name="/compare")
        while not job.done():
            time.sleep(0.2)
        html, payload, *_ = job.result()
    streamed = [out[0] for out in job.outputs()[:-1]]
    # Before the end: the heading names the question, the image and the budget; a method is
    # being written, and its column holds a beginning of the answer it ends with.
    assert all("“Describe the image.”" in h and "red.png" in h and "budget 0.5" in h for h in streamed)
    partial = {}
    for h in streamed:
        for method in ("full", "h2o"):
            start = h.find(f'data-method="{method}"')
            if "writing" in h and start >= 0 and " …" in h[start:]:
                body = unescape(h[start:].split("<div style='min-height:4em'>")[1].split(" …")[0])
                partial.setdefault(method, body)
    assert set(partial) == {"full", "h2o"}, "no partial answer shown while the comparison ran"
    for method, body in partial.items():
        assert body.strip() and payload["answers"][method].startswith(body.strip())
        assert len(body.strip()) < len(payload["answers"][method])
    # The end: KV kept against the full cache's bytes, and what this prompt length allows.
    kv = payload["metrics"]
    share = kv["h2o"]["kv_bytes"] / kv["full"]["kv_bytes"]
    assert f"({share:.0%} of full)" in html and "(100% of full)" in html
    assert "saves memory, not time" in html and "benchmarks.md" in html


def test_compare_can_add_local(server, images):
    client = Client(server.url, verbose=False)
    _, payload, *_ = client.predict(handle_file(str(images["blue"])), "what colour ?", 0.5, 4,
                                    ["elastic", "h2o", "local"], api_name="/compare")
    assert set(payload["answers"]) == {"full", "elastic", "h2o", "local"}


def test_compare_runs_the_chosen_methods(server, images):
    client = Client(server.url, verbose=False)
    _, payload, lengths, _ = client.predict(handle_file(str(images["red"])), "what colour ?", 0.5, 4,
                                            ["tova", "snapkv"], api_name="/compare")
    assert list(payload["answers"]) == ["full", "snapkv", "tova"]  # full first: it is the reference
    assert [t["name"] for t in figure(lengths)["data"]] == ["Full cache", "SnapKV", "TOVA"]
    with pytest.raises(AppError, match="mystery.* is not in the list of choices"):  # gradio's own check
        client.predict(handle_file(str(images["red"])), "what ?", 0.5, 4, ["elastic", "mystery"],
                       api_name="/compare")
    with pytest.raises(AppError, match="at least one method"):
        client.predict(handle_file(str(images["red"])), "what ?", 0.5, 4, [], api_name="/compare")


@pytest.mark.parametrize("image, question, expected", [
    ("text", "what ?", "not an image"),
    ("corrupt", "what ?", "broken.png is not a readable image"),
    ("red", "   ", "question"),
])
def test_compare_bad_input_has_a_clear_message(server, images, image, question, expected):
    client = Client(server.url, verbose=False)
    with pytest.raises(AppError, match=expected):
        client.predict(handle_file(str(images[image])), question, 0.3, 4, api_name="/compare")


@pytest.mark.parametrize("path", ["server png", "missing", "directory"])
def test_server_paths_sent_without_the_file_marker_are_refused_alike(server, images, path):
    # A bare {"path": ...} skips gradio's upload check: the app must not open it, and the
    # message must be the same whatever is (or is not) at that path.
    target = {"server png": images["red"], "missing": images["red"].parent / "nothing.png",
              "directory": images["red"].parent}[path]
    client = Client(server.url, verbose=False)
    with pytest.raises(AppError) as raised:
        client.predict({"path": str(target)}, "what colour ?", 0.5, 4, api_name="/compare")
    assert str(raised.value).count("file paths are not accepted") == 1
    assert "Error" not in str(raised.value).replace("AppError", "")  # no exception type names


@pytest.mark.parametrize("budget, expected", [(0, "less than minimum value 0.05"),
                                              (2, "greater than maximum value 1.0")])
def test_compare_rejects_a_budget_outside_the_range(server, images, budget, expected):
    client = Client(server.url, verbose=False)
    with pytest.raises(AppError, match=expected):
        client.predict(handle_file(str(images["red"])), "what ?", budget, 4, api_name="/compare")
    # ... and keeps serving.
    assert client.predict(handle_file(str(images["red"])), "what ?", 0.5, 4, api_name="/compare")


# -- bad input ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def conversation(server, images):
    client = Client(server.url, verbose=False)
    return client, chat(client, images["red"], "what colour ?")[-1][0]


def test_a_non_image_file_is_refused_by_type(server, images, conversation):
    # The box only takes images: gradio refuses other files before the handler runs
    # (the browser's file picker does not even offer them).
    client, history = conversation
    with pytest.raises(AppError, match="upload a file that is one of these formats: \\['image'\\]"):
        chat(client, images["text"], "what ?", history=history)


def test_a_text_only_message_is_answered(server):
    # No image anywhere in the chat: the model answers as a plain chat LM, the panel says so.
    out = chat(Client(server.url, verbose=False), None, "What is the capital of France?", method="full",
               max_new_tokens=12)[-1]
    content = out[0][-1]["content"]
    text = content if isinstance(content, str) else " ".join(b.get("text", "") for b in content)
    assert out[0][-1]["role"] == "assistant" and text.strip()
    assert not out[2].startswith("⚠️") and "KV entries" in out[2]


@pytest.mark.parametrize("case", ["renamed text", "corrupt", "empty", "too long"])
def test_bad_input_keeps_the_conversation(server, images, conversation, case):
    client, history = conversation
    too_long = "red " * (elastic.generation.context_length(server.model) + 50)
    image, text, expected = {
        "renamed text": (images["text_as_png"], "what ?", "not a readable image"),
        "corrupt": (images["corrupt"], "what ?", "not a readable image"),
        "empty": (None, "  ", "message is empty"),
        "too long": (None, too_long, f"limit is {app.MAX_QUESTION_CHARS}"),
    }[case]
    out = chat(client, image, text, history=history)[-1]
    kept = history
    assert out[0] == kept, "the conversation must be unchanged"
    assert out[2].startswith("⚠️") and expected in out[2]
    assert "/tmp/gradio" not in out[2]  # no server paths in messages


def test_tiny_budget_and_huge_image_still_answer_with_a_note(server, images):
    client = Client(server.url, verbose=False)
    out = chat(client, images["huge"], "what colour ?", budget=0.05, start_size=16, max_new_tokens=4)[-1]
    assert out[0][-1]["role"] == "assistant"
    assert "⚠️" in out[2] and "protected" in out[2]
    trace = session_trace(client)
    assert len(trace.layers[0].kept) >= len(trace.protected) + 1


def test_server_keeps_serving_after_bad_input(server, images):
    client = Client(server.url, verbose=False)
    chat(client, images["corrupt"], "what ?")
    with pytest.raises(AppError):
        chat(client, images["text"], "what ?")
    out = chat(client, images["red"], "what colour ?")[-1]
    assert out[0][-1]["role"] == "assistant" and "KV entries" in out[2]


# -- bounds on every request ---------------------------------------------------------------------
def test_a_20_mb_question_is_refused_in_well_under_a_second(server):
    import httpx

    body = json.dumps({"data": [{"text": "a" * 20_000_000, "files": []}], "fn_index": 0, "session_hash": "big"})
    start = time.perf_counter()
    reply = httpx.post(server.url + "gradio_api/queue/join", content=body,
                       headers={"content-type": "application/json"}, timeout=30)
    assert reply.status_code == 413 and "request body over" in reply.text
    assert time.perf_counter() - start < 1.0


def test_a_long_question_under_the_body_limit_is_refused_before_tokenising(server, images):
    client = Client(server.url, verbose=False)
    start = time.perf_counter()
    out = chat(client, None, "what " * 50_000)[-1]  # 250,000 characters
    assert out[2].startswith("⚠️") and "250000 characters" in out[2] and out[0] == []
    assert time.perf_counter() - start < 3.0


def test_a_request_stops_at_the_time_limit(server, images, monkeypatch):
    client = Client(server.url, verbose=False)
    monkeypatch.setattr(limits, "MAX_SECONDS", 3.0)
    with endless(server.model):
        start = time.perf_counter()
        out = chat(client, images["red"], "Describe the image in detail.", method="full", max_new_tokens=500)[-1]
        elapsed = time.perf_counter() - start
        _, payload, *_ = client.predict(handle_file(str(images["red"])), "Describe the image.", 0.5, 500,
                                        api_name="/compare")
    assert "time limit of 3 s" in out[2] and elapsed < 15
    assert session_trace(client).decode_steps < 499
    assert "full" in payload["answers"] and len(payload["answers"]) < 3
    assert any("time limit of 3 s" in w for w in payload["warnings"])


def test_a_full_queue_says_busy(server, images):
    queue = app.demo._queue
    size, queue.max_size = queue.max_size, 1
    clients = [Client(server.url, verbose=False) for _ in range(3)]
    message = {"text": "Describe the image in detail.", "files": [handle_file(str(images["red"]))]}
    with endless(server.model):
        try:
            running = clients[0].submit(message, [], "full", 1.0, 1, -8, 500, 0, api_name="/chat")
            wait_until(lambda: app.GENERATING, 60)
            waiting = clients[1].submit(message, [], "full", 1.0, 1, -8, 4, 0, api_name="/chat")
            time.sleep(1.0)
            with pytest.raises(Exception, match="Queue is full"):
                clients[2].predict(message, [], "full", 1.0, 1, -8, 4, 0, api_name="/chat")
            # Events that do not wait for the model still get through: a finished answer's
            # figures, and Stop.
            assert len(clients[2].predict(0, api_name="/panel")) == 11  # eight figures and texts, three sliders
            clients[0].predict(api_name="/stop")
            assert "Stopped after" in running.result()[2]
        finally:
            queue.max_size = size
            clients[0].predict(api_name="/stop")
            running.result()
    assert waiting.result()[0][-1]["role"] == "assistant"  # the waiting one still ran


@pytest.mark.parametrize("value", ["abc", None])
def test_malformed_numbers_are_named(server, images, value):
    client = Client(server.url, verbose=False)
    message = {"text": "what colour ?", "files": [handle_file(str(images["red"]))]}
    with pytest.raises(AppError, match="Budget \\(fraction kept\\) must be a number from 0.05 to 1"):
        client.predict(message, [], "elastic", value, 1, -8, 4, 0, api_name="/chat")
    with pytest.raises(AppError, match="Max new tokens must be a number"):
        client.predict(handle_file(str(images["red"])), "what ?", 0.5, value, api_name="/compare")


def test_a_lone_surrogate_or_malformed_history_is_refused(server, images):
    # What JSON can carry but gradio_client cannot send: the handler is called directly.
    def first_reply(message, history=()):
        return next(app.chat(message, list(history), "elastic", 0.5, 1, -8, 4, 0))

    out = first_reply({"text": "what \ud800 colour ?", "files": []})
    assert out[2].startswith("⚠️") and "not valid text" in out[2]
    for history in ([{"nonsense": 1}], [{"role": "user"}], ["text"]):
        out = first_reply({"text": "what colour ?", "files": []}, history)
        assert out[2].startswith("⚠️") and "malformed" in out[2] and out[0] == history
    out = first_reply("just a string")
    assert out[2].startswith("⚠️") and "empty" in out[2]


def test_a_user_mistake_is_one_line_in_the_log(server, images, capfd):
    client = Client(server.url, verbose=False)
    capfd.readouterr()
    with pytest.raises(AppError, match="Type a question"):
        client.predict(handle_file(str(images["red"])), "   ", 0.3, 4, api_name="/compare")
    chat(client, None, "  ")
    time.sleep(0.5)
    log = capfd.readouterr().err
    assert "Traceback" not in log
    lines = [line for line in log.splitlines() if "refused:" in line]
    assert len(lines) == 2 and "Type a question" in lines[0] and "message is empty" in lines[1]


def test_layer_nan_is_read_as_zero():
    assert [guards.index(v) for v in (float("nan"), None, "abc", 3.7, float("inf"), 2)] == [0, 0, 0, 3, 0, 2]


def test_an_abandoned_compare_stops_generating(server, images):
    client = Client(server.url, verbose=False)
    with endless(server.model):
        job = client.submit(handle_file(str(images["red"])), "Describe the image.", 0.5, 500, api_name="/compare")
        wait_until(lambda: app.GENERATING and job.outputs(), 60)
        assert app.GENERATING, "the compare should be running"
        job.cancel()
        assert wait_until(lambda: not app.GENERATING, 5), "the compare kept running after its client left"


def test_stop_ends_a_compare_with_the_answers_so_far(server, images):
    client = Client(server.url, verbose=False)
    with endless(server.model):
        job = client.submit(handle_file(str(images["red"])), "Describe the image.", 0.5, 500, api_name="/compare")
        wait_until(lambda: app.GENERATING, 60)
        time.sleep(0.5)
        client.predict(api_name="/stop")
        _, payload, *_ = job.result()
    assert list(payload["answers"]) == ["full"] and payload["answers"]["full"].strip()
    assert payload["metrics"]["full"]["new_tokens"] < 500
    assert any("Ended by Stop" in w and "not run: Elastic Cache, H2O" in w for w in payload["warnings"])


def test_one_client_evicts_only_its_own_sessions(monkeypatch):
    monkeypatch.setattr(sessions, "SESSIONS", OrderedDict())
    monkeypatch.setattr(limits, "MAX_SESSIONS", 6)
    monkeypatch.setattr(limits, "MAX_SESSIONS_PER_CLIENT", 3)

    def visit(host, key):
        return app.session_of(SimpleNamespace(session_hash=key, client=SimpleNamespace(host=host)))

    mine = [visit("10.0.0.1", f"mine{i}") for i in range(2)]
    for i in range(200):  # one client opens many sessions
        visit("10.0.0.2", f"spam{i}")
    assert [sessions.SESSIONS[f"mine{i}"] for i in range(2)] == mine  # untouched
    assert [k for k in sessions.SESSIONS if k.startswith("spam")] == ["spam197", "spam198", "spam199"]
    for host in ("10.0.0.3", "10.0.0.4"):  # the table fills: the heaviest client gives way
        visit(host, host)
    assert len(sessions.SESSIONS) == 6 and all(f"mine{i}" in sessions.SESSIONS for i in range(2))
    assert sum(k.startswith("spam") for k in sessions.SESSIONS) == 2


def test_the_server_holds_gradio_state_for_no_more_sessions_than_its_own(server):
    assert app.demo.state_session_capacity == app.MAX_SESSIONS


# -- wiring details -------------------------------------------------------------------------------
def test_clear_chat_resets_the_sliders_ranges():
    request = SimpleNamespace(session_hash="clearing", client=SimpleNamespace(host="h"))
    app.session_of(request).trace = object()  # as after an answer
    out = app.clear_chat(request)
    assert out[0] == [] and app.SESSIONS["clearing"].trace is None
    layer, step, head = out[-3:]
    assert layer == step == {"__type__": "update", "maximum": 1, "value": 0}
    assert head["visible"] is False


def test_unload_forgets_the_session():
    app.SESSIONS["gone"] = app.Session()
    app.forget_session(SimpleNamespace(session_hash="gone"))
    assert "gone" not in app.SESSIONS


def test_conversation_restarts_at_the_last_image():
    history = [
        {"role": "user", "content": [{"type": "file", "file": {"path": "/a.png"}}, {"type": "text", "text": "q1"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a1"}]},
        {"role": "user", "content": [{"type": "text", "text": "q2"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a2"}]},
    ]
    messages, image = app.conversation(history, "q3", None)
    assert image == "/a.png"
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[0]["content"][0] == {"type": "image"} and messages[-1]["content"] == [{"type": "text", "text": "q3"}]
    messages, image = app.conversation(history, "q3", "/b.png")
    assert image == "/b.png" and len(messages) == 1 and messages[0]["content"][0] == {"type": "image"}


def test_a_model_that_fails_to_load_gives_one_clear_message(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "app.py"), "--model", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not load model") and "missing" in last
    assert "Traceback" not in out.stderr


def test_quantize_reaches_load_model_and_a_bad_device_is_one_line(monkeypatch):
    calls = []
    monkeypatch.setattr(elastic, "load_model", lambda name, **kw: calls.append((name, kw)) or ("m", "p"))
    slot = app.ModelSlot("tiny-llava", quantize="int8")
    slot.load()
    slot.load(device="cpu")  # a later load keeps the setting
    assert calls == [("tiny-llava", {"device": None, "quantize": "int8"}),
                     ("tiny-llava", {"device": "cpu", "quantize": "int8"})]
    assert app.parse_args(["--quantize", "int8"]).quantize == "int8"
    out = subprocess.run([sys.executable, str(ROOT / "app.py"), "--model", "tiny-llava", "--device", "cuda:0",
                          "--quantize", "int8"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == "error: quantize='int8' is for decoding on a CPU, not on 'cuda:0'"


def test_compare_from_chat_carries_the_settings_and_context():
    history = [
        {"role": "user", "content": [{"type": "file", "file": {"path": "/a.png"}}, {"type": "text", "text": "q1"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a1"}]},
        {"role": "user", "content": [{"type": "text", "text": "q2"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a2"}]},
    ]
    image, question, budget, max_new, methods, use, context, _ = app.compare_from_chat(
        history, {"text": "", "files": []}, "snapkv", 0.25, 77)
    assert (image, question, budget, max_new) == ("/a.png", "q2", 0.25, 77)
    assert methods == ["elastic", "h2o", "snapkv"]
    assert context == history[:2] and use["value"] is True and "1 earlier question" in use["label"]
    _, question, *_, methods, use, context, _ = app.compare_from_chat(history, {"text": "q3"}, "h2o", 0.5, 9)
    assert question == "q3" and context == history and methods == ["elastic", "h2o"]
    *_, use, context, _ = app.compare_from_chat(history[:2], {"text": ""}, "elastic", 0.5, 9)
    assert context == [] and use["visible"] is False


def test_compare_with_context_answers_as_the_chat_does(server):
    # In-process (the context is a gr.State, which the API does not expose).
    scene = app.load_examples(app.EXAMPLES_DIR)[0]["image"]
    settings = ("full", 1.0, 1, -25, 8, 0)
    first = list(app.chat({"text": "What colour is the square?", "files": [scene]}, [], *settings))[-1][0]
    second = list(app.chat({"text": "And what shape is it?", "files": []}, first, *settings))[-1][0]
    answer = second[-1]["content"]
    with_context = list(app.compare(scene, "And what shape is it?", 0.5, 8, ["elastic"], True, second[:2]))[-1][1]
    assert with_context["answers"]["full"] == answer
    alone = list(app.compare(scene, "And what shape is it?", 0.5, 8, ["elastic"], False, second[:2]))[-1][1]
    direct = elastic.generate(server.model, app.MODEL.processor, scene, "And what shape is it?", method="full",
                              budget=1.0, max_new_tokens=8)
    assert alone["answers"]["full"] == direct.text
    assert with_context["metrics"]["full"]["prompt_tokens"] > alone["metrics"]["full"]["prompt_tokens"] \
        == direct.stats["prompt_tokens"]
    text_only = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}]
    answered = list(app.compare(scene, "What colour is the circle?", 0.5, 4, ["elastic"], True, text_only))[-1][1]
    assert answered["answers"]["full"].strip()  # a text-only chat as context: the image joins its first turn
    assert "what is here?" in app.waiting_status({"text": "what is here?"}) and "running" not in \
        app.waiting_status({"text": "what is here?"})


def test_the_waiting_status_says_what_runs_and_how_long_answers_take(monkeypatch):
    monkeypatch.setattr(runner, "GENERATING", {object()})
    monkeypatch.setattr(runner, "DURATIONS", deque([4.0, 10.0, 6.0]))
    status = app.waiting_status({"text": "what colour?"})
    assert "“what colour?”" in status and "1 running now" in status and "about 6 s" in status
    assert app.waiting_status({"text": "  "}) == "" and app.waiting_status(None) == ""


def test_compare_methods_are_checked_and_ordered():
    assert app.compare_methods(["tova", "elastic"]) == ("full", "elastic", "tova")
    assert app.compare_methods(None) == app.COMPARE_METHODS
    assert app.compare_methods(True) == app.COMPARE_METHODS + ("local",)  # the old include_local flag
    with pytest.raises(gr.Error, match="Unknown method"):
        app.compare_methods(["elastic", "mystery"])
    with pytest.raises(gr.Error, match="at least one method"):
        app.compare_methods(["full"])
