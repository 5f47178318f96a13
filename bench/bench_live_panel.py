"""Streaming speed with the live Explore panel on, against the library and the app without it.

    ./run.sh python bench/bench_live_panel.py                  # default model, full + elastic
    ./run.sh python bench/bench_live_panel.py --methods elastic --new 120 --repeats 5
    ./run.sh python bench/bench_live_panel.py --shown image     # the page shows the Image tab

Measured side by side in one run, each the median of ``--repeats`` runs after one warm-up,
taken in turn (library, app, app + live panel, then again),
on the same image, prompt, method, budget and token limit (EOS switched off, so every run
decodes ``--new`` tokens):

* ``library``: :func:`elastic.generate` with a ``TextIteratorStreamer`` drained by the caller;
* ``app``: one ``/chat`` request through ``gradio_client`` (the app launched in-process, as in
  ``bench/bench_app_streaming.py``), new tokens / wall seconds from submit to the final state;
* ``app + live panel``: the same, while a thread asks ``/live`` for the same session every
  ``explorer.limits.LIVE_SECONDS`` (what the page's timer does), saying which figure tab the
  page shows (``--shown``, default "timeline": Cache over time): the figures of the answer
  being written are drawn on the server and sent, as to a browser. By default
  (``--poller process``) the poller is a process of its own that asks as a page does (a POST
  to ``/gradio_api/run/live`` with the chat's session hash); on this machine it still takes
  CPU from the same two cores, which a remote browser would not. ``--poller thread`` polls
  through the chat's ``gradio_client.Client`` from a thread of the server's process, so that
  decoding the figures' JSON competes for the server's GIL too: a pessimistic measure.

Target (issue 32): app + live panel >= 0.85 x the library's tokens/s, and the shown tab's
decoding view redrawn at least once a second. The last columns give how many live redraws
(new figures of the shown tab) arrived per second from submit to the end of the answer (the
prefill, before the first snapshot, included), and the longest time between two redraws
over all runs.
"""

from __future__ import annotations

import multiprocessing
import statistics
import tempfile
import threading
import time

import torch
from bench_app_streaming import arguments, library_rate, serve_app  # this folder: run as bench/bench_live_panel.py

from elastic.tiny.data import DESCRIBE_PROMPT, VAL_OFFSET, make_scene, render


def poll_live(ask, period, shown, stop, redraws):
    """Call ``ask(shown)`` (one /live request) every ``period`` seconds, as the page's timer
    does when it shows the figure tab ``shown``, until ``stop`` is set; a redraw (its time
    appended to ``redraws``) is a new figure of that tab. ``stop`` is a ``threading.Event`` or,
    in the page's process, the end of a ``multiprocessing`` pipe on which the bench says "stop"."""
    from explorer.panel import PANEL, SHOWN_VIEWS

    drawn = [PANEL.index(view) for view in SHOWN_VIEWS[shown]]
    stopped = stop.is_set if hasattr(stop, "is_set") else stop.poll
    wait = stop.wait if hasattr(stop, "wait") else stop.poll
    while not stopped():
        asked = time.monotonic()
        out = ask(shown)
        if any(isinstance(out[i], dict) and "plot" in out[i] for i in drawn):
            redraws.append(asked)
        wait(max(period - (time.monotonic() - asked), 0))


def page(url, conn):
    """A page's timer in a process of its own, as a browser's is, asking as the page does: a
    POST to ``/gradio_api/run/live`` with the session's hash (the event is not queued). For
    each ("poll", session, shown, period) it polls until told "stop", then sends back the
    redraw times."""
    import json
    import urllib.request

    def ask(shown):
        body = json.dumps({"data": [0, 0, shown], "session_hash": session, "fn_index": None}).encode()
        request = urllib.request.Request(url + "gradio_api/run/live", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request) as reply:
            return json.load(reply)["data"]

    conn.send("ready")
    while (order := conn.recv()) != "quit":
        _, session, shown, period = order
        redraws = []
        poll_live(ask, period, shown, conn, redraws)
        conn.recv()  # the "stop"
        conn.send(redraws)


def app_rate(client, app, image_path, method, budget, new, live_period=None, shown="all", page_conn=None):
    from gradio_client import handle_file

    message = {"text": DESCRIBE_PROMPT, "files": [handle_file(image_path)]}
    stop, redraws, poller = threading.Event(), [], None
    if live_period and page_conn is not None:
        page_conn.send(("poll", client.session_hash, shown, live_period))
    elif live_period:
        ask = lambda shown: client.predict(0, 0, shown, api_name="/live")  # noqa: E731
        poller = threading.Thread(target=poll_live, args=(ask, live_period, shown, stop, redraws))
        poller.start()
    start = time.perf_counter()
    client.predict(message, [], method, budget, 1, -25, new, 0, api_name="/chat")
    seconds = time.perf_counter() - start
    if poller is not None:
        stop.set()
        poller.join()
    if live_period and page_conn is not None:
        page_conn.send("stop")
        redraws = page_conn.recv()
    trace = app.SESSIONS[client.session_hash].trace
    gaps = [b - a for a, b in zip(redraws, redraws[1:])]
    return (trace.decode_steps + 1) / seconds, (len(redraws) / seconds, max(gaps, default=float("nan")))


def round_robin(fns, repeats):
    """Median rate and redraws per second, and the longest gap between two redraws, of each
    of ``fns`` after one warm-up each, the runs taken in
    turn (one of each, ``repeats`` times), so a slow spell of a busy machine hits them alike."""
    for fn in fns:
        fn()
    runs = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, runs):
            out.append(fn())
    return [(statistics.median(r[0] for r in out), statistics.median(r[1][0] for r in out),
             max(r[1][1] for r in out)) for out in runs]


def main(argv=None):
    ap = arguments(__doc__)
    ap.add_argument("--poller", choices=("process", "thread"), default="process",
                    help="the page's timer in its own process (as a browser's) or a thread of this one")
    ap.add_argument("--shown", default="timeline", help="the figure tab the emulated page shows "
                    "(explorer.panel.SHOWN_VIEWS: attention, groups, image, timeline, how, all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from explorer import limits

    app, model, processor, client = serve_app(args.model)  # EOS off: every answer decodes --new tokens
    page_conn = None
    if args.poller == "process":
        page_conn, theirs = multiprocessing.get_context("spawn").Pipe()
        browser = multiprocessing.get_context("spawn").Process(target=page, args=(app.demo.local_url, theirs),
                                                               daemon=True)
        browser.start()
        assert page_conn.recv() == "ready"
    image = render(make_scene(VAL_OFFSET + 1))
    rows = []
    with tempfile.NamedTemporaryFile(suffix=".png") as f:
        image.save(f.name)
        for method in args.methods.split(","):
            budget = 1.0 if method == "full" else args.budget
            (lib, _, _), (plain, _, _), (live, redraws, gap) = round_robin([
                lambda: (library_rate(model, processor, image, method, budget, args.new), (0.0, 0.0)),
                lambda: app_rate(client, app, f.name, method, budget, args.new),
                lambda: app_rate(client, app, f.name, method, budget, args.new, limits.LIVE_SECONDS,
                                 args.shown, page_conn)], args.repeats)
            rows.append((method, budget, lib, plain, live, redraws, gap))
    if page_conn is not None:
        page_conn.send("quit")
    app.demo.close()
    print("| method | budget | library tok/s | app tok/s | app + live panel tok/s | app / library "
          "| app + live / library | live redraws / s | longest gap between redraws (s) |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for method, budget, lib, plain, live, redraws, gap in rows:
        print(f"| {method} | {budget:g} | {lib:.1f} | {plain:.1f} | {live:.1f} | {plain / lib:.2f} | "
              f"{live / lib:.2f} | {redraws:.2f} | {gap:.2f} |")
    print(f"\n{args.new} new tokens, median of {args.repeats} round-robin runs after a warm-up, {args.threads} threads, "
          f"live panel every {limits.LIVE_SECONDS:g} s showing the {args.shown!r} figure tab, asked by a {args.poller} "
          f"of its own")


if __name__ == "__main__":
    main()
