"""Soak the app: many requests from many sessions, resident memory every ``--every``; then
``--clients`` clients at once (issue 15's record).

    ./run.sh python bench/soak_app.py                       # 1000 requests, 8 concurrent clients
    ./run.sh python bench/soak_app.py --requests 200 --every 50

The app runs in-process on the default model, as ``./run.sh app`` serves it; requests go
through ``gradio_client``. The soak cycles through a short chat (4 new tokens), a refused
chat (empty message), a short ``/compare`` (2 new tokens, Elastic beside the full cache), a
slider replay and ``/stop``, with a new client (a new session) every other request, so the
app's session cap (``app.MAX_SESSIONS``) is passed several times over. Printed: markdown
tables of resident memory (``VmRSS`` of this process, which holds the server) and of the
concurrent clients (queue rank first seen, seconds to the answer, and whether each got an
answer to its own question).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

import torch


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        line = next(l for l in status if l.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=None, help="generations at once (app.CONCURRENCY)")
    ap.add_argument("--new", type=int, default=16, help="new tokens per concurrent client's answer")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.concurrency is not None:  # read when app is imported
        os.environ["ELASTIC_CONCURRENCY"] = str(args.concurrency)

    from gradio_client import Client, handle_file

    import app
    import elastic
    from elastic.tiny.data import VAL_OFFSET, make_scene, render

    model, processor = elastic.load_model(device="cpu")
    app.MODEL.set(model, processor)
    app.serve(prevent_thread_lock=True, quiet=True)
    url = app.demo.local_url
    folder = tempfile.mkdtemp()
    images = []
    for i in range(4):
        path = f"{folder}/scene{i}.png"
        render(make_scene(VAL_OFFSET + 1 + i)).save(path)
        images.append(path)

    def request(client, i):
        kind = i % 5
        image = handle_file(images[i % len(images)])
        if kind == 0:
            client.predict({"text": "What colour is the shape in cell 1?", "files": [image]}, [], "elastic", 0.5, 1,
                           -25, 4, 0, api_name="/chat")
            client.predict(0, api_name="/panel")  # as the page does after every answer
        elif kind == 1:
            out = client.predict({"text": "  ", "files": []}, [], "elastic", 0.5, 1, -25, 4, 0, api_name="/chat")
            assert "empty" in out[2]
        elif kind == 2:
            client.predict(image, "What is in the image?", 0.5, 2, ["elastic"], api_name="/compare")
        elif kind == 3:
            client.predict({"text": "Describe the image.", "files": [image]}, [], "h2o", 0.3, 1, -25, 2, 0,
                           api_name="/chat")
            client.predict(0, api_name="/panel")
        else:
            client.predict(api_name="/stop")

    failures, start, client = 0, time.perf_counter(), None
    if args.requests:
        print(f"| requests | RSS (MB) | app sessions | gradio sessions | failures | seconds |\n|---|---|---|---|---|---|")
        print(f"| 0 | {rss_mb():.0f} | {len(app.SESSIONS)} | {len(app.demo.state_holder.session_data)} | 0 | 0 |",
              flush=True)
    for i in range(args.requests):
        if i % 2 == 0:
            client = Client(url, verbose=False)
        try:
            request(client, i)
        except Exception as error:  # counted and shown, the soak goes on
            failures += 1
            print(f"request {i}: {type(error).__name__}: {str(error)[:120]}", flush=True)
        if (i + 1) % args.every == 0:
            print(f"| {i + 1} | {rss_mb():.0f} | {len(app.SESSIONS)} | {len(app.demo.state_holder.session_data)} "
                  f"| {failures} | {time.perf_counter() - start:.0f} |", flush=True)

    # -- concurrent clients: each asks about its own scene
    results = [None] * args.clients

    def one(k):
        client = Client(url, verbose=False)
        question = f"What is in cell {k % 9 + 1}?"
        t0 = time.perf_counter()
        job = client.submit({"text": question, "files": [handle_file(images[k % len(images)])]}, [], "elastic",
                            0.5, 1, -25, args.new, 0, api_name="/chat")
        rank = None
        while not job.done():
            status = job.status()
            if rank is None and status.rank is not None:
                rank = status.rank
            time.sleep(0.05)
        out = job.result()
        asked = " ".join(b.get("text", "") for b in out[0][-2]["content"] if isinstance(b, dict))
        results[k] = (rank, time.perf_counter() - t0, question in asked and out[0][-1]["role"] == "assistant")

    threads = [threading.Thread(target=one, args=(k,)) for k in range(args.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"\n{args.clients} clients at once ({args.new} new tokens each, {app.CONCURRENCY} generation(s) at once), "
          f"all done in "
          f"{time.perf_counter() - t0:.1f} s\n\n| client | queue rank first seen | seconds to answer | own answer |\n"
          f"|---|---|---|---|")
    for k, (rank, seconds, own) in enumerate(results):
        print(f"| {k} | {rank} | {seconds:.1f} | {own} |")
    app.demo.close()


if __name__ == "__main__":
    main()
