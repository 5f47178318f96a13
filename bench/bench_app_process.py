"""Streaming cost with the app in its own process, as deployed (issue 14).

    ./run.sh python bench/bench_app_process.py --hz 10,3,0.01

For each chat update rate, starts ``python app.py`` on a free port with
``ELASTIC_STREAM_HZ`` set, sends the first example's question through ``gradio_client`` from
this process ``--runs`` times (the first one warms up), and prints the median end-to-end
tokens/s and the decode speed the app's own status line reports. The answer has its natural
length (the full cache), so compare with the library's speed on the same prompt, printed first.
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hz", default="10,3,0.01", help="chat updates per second to try")
    ap.add_argument("--runs", type=int, default=4)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch
    from gradio_client import Client, handle_file

    import app
    import elastic

    example = app.load_examples(app.EXAMPLES_DIR)[0]
    torch.set_num_threads(2)
    model, processor = elastic.load_model(device="cpu")
    rates = []
    for _ in range(args.runs):
        gen = elastic.generate(model, processor, example["image"], example["prompt"], method="full", budget=1.0,
                               max_new_tokens=160)
        rates.append(gen.stats["new_tokens"] / gen.stats["total_s"])
    print(f"library: {statistics.median(rates[1:]):.1f} tok/s end to end, "
          f"{gen.stats['tokens_per_s']:.1f} decoding ({gen.stats['new_tokens']} tokens)\n")
    del model
    print("| updates / s | app tok/s end to end | decode tok/s (status line) |\n|---|---|---|")
    for hz in args.hz.split(","):
        port = free_port()
        server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port)], cwd=ROOT,
                                  env={**os.environ, "ELASTIC_STREAM_HZ": hz}, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            for _ in range(240):
                try:
                    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                    break
                except Exception:
                    time.sleep(1)
            ends, decodes = [], []
            for _ in range(args.runs):
                start = time.perf_counter()
                out = client.predict({"text": example["prompt"], "files": [handle_file(example["image"])]}, [],
                                     "full", 1.0, 1, -25, 160, 0, api_name="/chat")
                seconds = time.perf_counter() - start
                ends.append(int(re.search(r"(\d+) new tokens", out[2]).group(1)) / seconds)
                decodes.append(float(re.search(r"([\d.]+) tokens/s", out[2]).group(1)))
            print(f"| {hz} | {statistics.median(ends[1:]):.1f} | {statistics.median(decodes[1:]):.1f} |", flush=True)
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
