"""Streaming speed with the app in its own process, as deployed (issue 14).

    ./run.sh python bench/bench_app_process.py --hz 10,3,0.01

For each chat update rate, starts ``python app.py`` on a free port with
``ELASTIC_STREAM_HZ`` set and sends the first example's question through ``gradio_client``,
``--runs`` times after one warm-up, each app run next to a library run
(``elastic.generate`` in this process, same prompt, full cache, natural length), so both
see the same machine. Per rate it prints the medians of:

* the library's tokens/s, new tokens / its ``total_s`` (prefill included);
* the app's tokens/s to the complete answer: new tokens / seconds from sending until the
  client holds the whole answer text (the figures come after it);
* the app's tokens/s until its figures are drawn (``/chat``, then ``/panel``, as the page
  chains them), and the decode speed its status line reports.

The client does not download the files in each streamed update (``download_files=False``),
as a browser, which caches the image, does not; gradio_client's default fetches the chat's
image again for every update (``--download-files``: see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_chat(client, example, handle_file) -> dict:
    """Send the example's question; poll the streamed outputs every 10 ms for their times."""
    start = time.perf_counter()
    job = client.submit({"text": example["prompt"], "files": [handle_file(example["image"])]}, [],
                        "full", 1.0, 1, -25, 160, 0, api_name="/chat")
    seen, times = 0, []
    while not job.done():
        n = len(job.outputs())
        times += [time.perf_counter() - start] * (n - seen)
        seen = n
        time.sleep(0.01)
    final = job.result()
    end = time.perf_counter() - start
    client.predict(0, api_name="/panel")  # what the page chains after /chat: the figures
    figures = time.perf_counter() - start
    outputs = job.outputs()
    times += [end] * (len(outputs) - len(times))
    answer = final[0][-1]  # the chat's last message
    complete = next(t for out, t in zip(outputs, times) if out[0] and out[0][-1] == answer)
    return {"tokens": int(re.search(r"(\d+) new tokens", final[2]).group(1)), "complete_s": complete, "figures_s": figures,
            "decode": float(re.search(r"([\d.]+) tokens/s", final[2]).group(1)), "updates": len(outputs)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hz", default="10,3,0.01", help="chat updates per second to try")
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--download-files", action="store_true",
                    help="let gradio_client download every update's files (its default; a browser does not)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch
    from gradio_client import Client, handle_file

    import app
    import elastic

    example = app.load_examples(app.EXAMPLES_DIR)[0]
    torch.set_num_threads(2)
    model, processor = elastic.load_model(device="cpu")

    def library() -> float:
        gen = elastic.generate(model, processor, example["image"], example["prompt"], method="full", budget=1.0,
                               max_new_tokens=160)
        return gen.stats["new_tokens"] / gen.stats["total_s"]

    library()
    print("| updates / s | library tok/s | app tok/s to the complete answer | ratio | app tok/s to the figures "
          "| app decode tok/s (status line) | updates |\n|---|---|---|---|---|---|---|", flush=True)
    for hz in args.hz.split(","):
        port = free_port()
        server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port)], cwd=ROOT,
                                  env={**os.environ, "ELASTIC_STREAM_HZ": hz}, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            for _ in range(240):
                try:
                    client = Client(f"http://127.0.0.1:{port}/", verbose=False,
                                    **({} if args.download_files else {"download_files": False}))
                    break
                except Exception:
                    time.sleep(1)
            timed_chat(client, example, handle_file)  # warm-up: the app's first answer loads the model
            lib, runs = [], []
            for _ in range(args.runs):
                lib.append(library())
                runs.append(timed_chat(client, example, handle_file))
            med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
            to_text = statistics.median(r["tokens"] / r["complete_s"] for r in runs)
            to_end = statistics.median(r["tokens"] / r["figures_s"] for r in runs)
            print(f"| {hz} | {statistics.median(lib):.1f} | {to_text:.1f} | {to_text / statistics.median(lib):.2f}x "
                  f"| {to_end:.1f} | {med('decode'):.1f} | {med('updates'):.0f} |", flush=True)
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
