"""Streaming speed with the live Explore panel on, against the library and the app without it.

    ./run.sh python bench/bench_live_panel.py                  # default model, full + elastic
    ./run.sh python bench/bench_live_panel.py --methods elastic --new 120 --repeats 5

Measured side by side in one run, each the median of ``--repeats`` runs after one warm-up,
taken in turn (library, app, app + live panel, then again),
on the same image, prompt, method, budget and token limit (EOS switched off, so every run
decodes ``--new`` tokens):

* ``library``: :func:`elastic.generate` with a ``TextIteratorStreamer`` drained by the caller;
* ``app``: one ``/chat`` request through ``gradio_client`` (the app launched in-process, as in
  ``bench/bench_app_streaming.py``), new tokens / wall seconds from submit to the final state;
* ``app + live panel``: the same, while a thread asks ``/live`` for the same session every
  ``explorer.limits.LIVE_SECONDS`` (what the page's timer does): the figures of the answer
  being written are drawn on the server and sent, as to a browser. The poller shares the
  chat's ``gradio_client.Client`` (one event stream per session, as a page has), so it runs in
  this process and its decoding of the figures' JSON competes for the GIL too: a pessimistic
  measure of what a browser (its own process) costs the server.

Target (issue 32): app + live panel >= 0.85 x the library's tokens/s. The last column gives
how many live redraws (new figures) arrived per second of streaming.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time

import torch
from transformers import TextIteratorStreamer

import elastic
from elastic.tiny.data import DESCRIBE_PROMPT, VAL_OFFSET, make_scene, render


def library_rate(model, processor, image, method, budget, new):
    streamer = TextIteratorStreamer(getattr(processor, "tokenizer", processor), skip_prompt=True)
    out = {}
    start = time.perf_counter()
    worker = threading.Thread(target=lambda: out.update(gen=elastic.generate(
        model, processor, image, DESCRIBE_PROMPT, method=method, budget=budget, max_new_tokens=new,
        streamer=streamer)))
    worker.start()
    for _ in streamer:
        pass
    worker.join()
    return out["gen"].stats["new_tokens"] / (time.perf_counter() - start), 0.0


def poll_live(client, period, stop, redraws):
    """Ask /live every ``period`` seconds, as the page's timer does, until ``stop`` is set."""
    while not stop.is_set():
        asked = time.perf_counter()
        out = client.predict(0, 0, api_name="/live")
        if isinstance(out[3], dict) and "plot" in out[3]:
            redraws.append(asked)
        stop.wait(max(period - (time.perf_counter() - asked), 0))


def app_rate(client, app, image_path, method, budget, new, live_period=None):
    from gradio_client import handle_file

    message = {"text": DESCRIBE_PROMPT, "files": [handle_file(image_path)]}
    stop, redraws, poller = threading.Event(), [], None
    if live_period:
        poller = threading.Thread(target=poll_live, args=(client, live_period, stop, redraws))
        poller.start()
    start = time.perf_counter()
    client.predict(message, [], method, budget, 1, -25, new, 0, api_name="/chat")
    seconds = time.perf_counter() - start
    if poller is not None:
        stop.set()
        poller.join()
    trace = app.SESSIONS[client.session_hash].trace
    return (trace.decode_steps + 1) / seconds, len(redraws) / seconds


def round_robin(fns, repeats):
    """Median (rate, redraws) of each of ``fns`` after one warm-up each, the runs taken in
    turn (one of each, ``repeats`` times), so a slow spell of a busy machine hits them alike."""
    for fn in fns:
        fn()
    runs = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, runs):
            out.append(fn())
    return [(statistics.median(r[0] for r in out), statistics.median(r[1] for r in out)) for out in runs]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--methods", default="full,elastic")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--new", type=int, default=120, help="new tokens per answer (EOS off)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from gradio_client import Client

    import app
    from explorer import limits

    model, processor = elastic.load_model(args.model, device="cpu")
    model.generation_config.eos_token_id = None  # every answer decodes exactly --new tokens
    app.MODEL.set(model, processor)
    app.serve(prevent_thread_lock=True, quiet=True)
    client = Client(app.demo.local_url, verbose=False, download_files=False)
    image = render(make_scene(VAL_OFFSET + 1))
    rows = []
    with tempfile.NamedTemporaryFile(suffix=".png") as f:
        image.save(f.name)
        for method in args.methods.split(","):
            budget = 1.0 if method == "full" else args.budget
            (lib, _), (plain, _), (live, redraws) = round_robin([
                lambda: library_rate(model, processor, image, method, budget, args.new),
                lambda: app_rate(client, app, f.name, method, budget, args.new),
                lambda: app_rate(client, app, f.name, method, budget, args.new, limits.LIVE_SECONDS)], args.repeats)
            rows.append((method, budget, lib, plain, live, redraws))
    app.demo.close()
    print("| method | budget | library tok/s | app tok/s | app + live panel tok/s | app / library "
          "| app + live / library | live redraws / s |\n|---|---|---|---|---|---|---|---|")
    for method, budget, lib, plain, live, redraws in rows:
        print(f"| {method} | {budget:g} | {lib:.1f} | {plain:.1f} | {live:.1f} | {plain / lib:.2f} | "
              f"{live / lib:.2f} | {redraws:.2f} |")
    print(f"\n{args.new} new tokens, median of {args.repeats} round-robin runs after a warm-up, {args.threads} threads, "
          f"live panel every {limits.LIVE_SECONDS:g} s")


if __name__ == "__main__":
    main()
