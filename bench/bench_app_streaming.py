"""Streaming speed of the app against the library, on the same prompt (issue 14's target).

    ./run.sh python bench/bench_app_streaming.py                 # default model, 2 threads
    ./run.sh python bench/bench_app_streaming.py --methods full,elastic --new 120 --repeats 5

Measured side by side in one run, each the median of ``--repeats`` runs after one warm-up:

* ``library``: :func:`elastic.generate` with a ``TextIteratorStreamer`` drained by the
  caller, new tokens / wall seconds from the call to the end;
* ``app``: the app launched in-process, one ``/chat`` request through ``gradio_client`` with
  the same image, prompt, method, budget and token limit, new tokens (from the session's
  trace) / wall seconds from submit to the final state.

The answers are forced to ``--new`` tokens (EOS switched off) so both sides decode the
same number. Target: app tokens/s >= 0.8 x the library's.
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
    return out["gen"].stats["new_tokens"] / (time.perf_counter() - start)


def app_rate(client, app, image_path, method, budget, new):
    from gradio_client import handle_file

    message = {"text": DESCRIBE_PROMPT, "files": [handle_file(image_path)]}
    start = time.perf_counter()
    client.predict(message, [], method, budget, 1, -25, new, 0, api_name="/chat")
    seconds = time.perf_counter() - start
    trace = app.SESSIONS[client.session_hash].trace
    return (trace.decode_steps + 1) / seconds


def arguments(doc: str) -> argparse.ArgumentParser:
    """The options the app streaming benches share (model, methods, budget, tokens, rounds, threads)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--methods", default="full,elastic")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--new", type=int, default=120, help="new tokens per answer (EOS off)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    return ap


def serve_app(model_name):
    """The app launched in this process on ``model_name`` (EOS off: every answer decodes
    exactly the tokens asked for) and a ``gradio_client`` for it (as a browser: no
    re-download per update): ``(app, model, processor, client)``."""
    from gradio_client import Client

    import app

    model, processor = elastic.load_model(model_name, device="cpu")
    model.generation_config.eos_token_id = None
    app.MODEL.set(model, processor)
    app.serve(prevent_thread_lock=True, quiet=True)
    return app, model, processor, Client(app.demo.local_url, verbose=False, download_files=False)


def median_rate(fn, repeats):
    fn()  # warm-up
    return statistics.median(fn() for _ in range(repeats))


def main(argv=None):
    ap = arguments(__doc__)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    app, model, processor, client = serve_app(args.model)
    image = render(make_scene(VAL_OFFSET + 1))
    rows = []
    with tempfile.NamedTemporaryFile(suffix=".png") as f:
        image.save(f.name)
        for method in args.methods.split(","):
            budget = 1.0 if method == "full" else args.budget
            lib = median_rate(lambda: library_rate(model, processor, image, method, budget, args.new), args.repeats)
            web = median_rate(lambda: app_rate(client, app, f.name, method, budget, args.new), args.repeats)
            rows.append((method, budget, lib, web))
    app.demo.close()
    print(f"| method | budget | library tok/s | app tok/s (gradio_client) | app / library |\n|---|---|---|---|---|")
    for method, budget, lib, web in rows:
        print(f"| {method} | {budget:g} | {lib:.1f} | {web:.1f} | {web / lib:.2f} |")
    print(f"\n{args.new} new tokens, median of {args.repeats} after a warm-up, {args.threads} threads")


if __name__ == "__main__":
    main()
