"""Speed of a scene model on this CPU: what a user of the app waits for.

    ./run.sh python bench/bench_embedded.py --threads 2 --repeats 3   # the default, scene-smollm2
    ./run.sh python bench/bench_embedded.py --model tiny-llava --threads 1

Results and the command's date are in docs/benchmarks.md ("The default model").

Measured side by side in one run, each the median of ``--repeats`` runs after one warm-up;
the generation rows run round-robin (one of each in turn), so a slow spell of the machine
slows all of them alike:

* ``load``: ``elastic.load_model()`` once the cache directory exists;
* ``prefill``: the prompt's forward pass (time to the first token in the library);
* ``80 tokens``: a greedy description forced to 80 new tokens, full cache and Elastic 0.5,
  and the full cache with ``quantize="int8"`` (weight-only int8 language model);
* ``app first token``: the app launched in-process, one ``/chat`` request through
  ``gradio_client``, from submit to the first streamed text (full cache and Elastic 0.5);
* ``app tokens/s`` vs ``library tokens/s`` for the same answer;
* ``SmolLM2 alone`` (default model only): the language model by itself, as stock
  transformers runs it (``AutoModelForCausalLM``, ``DynamicCache``, a short text chat
  prompt), forced to the same number of new tokens: the speed this CPU allows the LM before
  any image, cache policy or app is added.

Targets (issue 12, for SmolLM2 with eyes): an 80-token description in at most 3 s, the
app's first streamed token within 1 s of sending.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import elastic
from elastic.tiny.data import DESCRIBE_PROMPT, VAL_OFFSET, make_scene, render


def library(model, processor, image, method: str, budget: float, new: int):
    """One greedy answer with exactly ``new`` tokens (EOS suppressed)."""
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        return elastic.generate(model, processor, image, DESCRIBE_PROMPT, method=method, budget=budget,
                                max_new_tokens=new)
    finally:
        model.generation_config.eos_token_id = eos


def round_robin(runs: dict, repeats: int) -> tuple[dict, dict]:
    """Median seconds of each run (keyed as given) and its last result: one warm-up each, then ``repeats``
    rounds that run every one in turn (a slow spell of the machine hits all of them)."""
    results = {label: run() for label, run in runs.items()}
    times = {label: [] for label in runs}
    for _ in range(repeats):
        for label, run in runs.items():
            t0 = time.perf_counter()
            results[label] = run()
            times[label].append(time.perf_counter() - t0)
    return {label: statistics.median(t) for label, t in times.items()}, results


def bare_lm(new: int):
    """SmolLM2-135M-Instruct alone writing ``new`` tokens (a function to time), and its prompt length."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from elastic.embedded import language_model_dir

    path = language_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return (lambda: lm.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False),
            inputs["input_ids"].shape[1])


def app_first_token(url: str, image_path: str, method: str, repeats: int) -> tuple[float, float]:
    """Median seconds from submit to the first streamed text, and the app's tokens/s."""
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False, download_files=False)  # as a browser: no re-download per update
    firsts, rates = [], []
    for i in range(repeats + 1):
        message = {"text": DESCRIBE_PROMPT, "files": [handle_file(image_path)]}
        t0 = time.perf_counter()
        job = client.submit(message, [], method, 0.5, 1, -25, 160, 0, api_name="/chat")
        first = None
        while not job.done():
            outs = job.outputs()
            if first is None and outs and outs[-1][0] and outs[-1][0][-1].get("content"):
                first = time.perf_counter() - t0
            time.sleep(0.005)
        total = time.perf_counter() - t0
        final = job.outputs()[-1]
        words = final[0][-1]["content"]
        if isinstance(words, list):
            words = " ".join(b.get("text", "") for b in words if isinstance(b, dict))
        if i:  # the first request warms up
            firsts.append(first if first is not None else total)
            rates.append(len(words.split()) / total)
    return statistics.median(firsts), statistics.median(rates)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="scene-smollm2", help="scene-smollm2, tiny-llava or a LLaVA directory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new", type=int, default=80)
    ap.add_argument("--no-app", action="store_true", help="skip the app measurements")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    elastic.load_model(args.model, device="cpu")  # builds the cache directory if needed
    load_s, loaded = round_robin({"load": lambda: elastic.load_model(args.model, device="cpu")},
                                 max(1, args.repeats // 2))
    model, processor = loaded["load"]
    scene = make_scene(VAL_OFFSET)
    image = render(scene)
    rows = [("load (cached)", "", f"{load_s['load']:.2f} s")]
    int8, _ = elastic.load_model(args.model, device="cpu", quantize="int8")
    runs = {  # (what, method) -> one run; measured round-robin so drift hits them alike
        (f"{args.new} tokens", "full 1"): lambda: library(model, processor, image, "full", 1.0, args.new),
        (f"{args.new} tokens", "elastic 0.5"): lambda: library(model, processor, image, "elastic", 0.5, args.new),
        (f"{args.new} tokens, int8 weights", "full 1"): lambda: library(int8, processor, image, "full", 1.0, args.new),
    }
    if args.model == "scene-smollm2":
        alone, prompt = bare_lm(args.new)
        runs[(f"{args.new} tokens, SmolLM2 alone (text, {prompt} prompt tokens)", "stock DynamicCache")] = alone
    secs, results = round_robin(runs, args.repeats)
    for (what, method), result in results.items():
        prefill = getattr(result, "stats", {}).get("prefill_s")
        if prefill is not None:
            label = what.replace(f"{args.new} tokens", "prefill")
            rows.append((label, method, f"{prefill:.3f} s ({result.trace.prompt_length} tokens)"))
        rows.append((what, method, f"{secs[(what, method)]:.2f} s ({args.new / secs[(what, method)]:.1f} tok/s)"))
    del int8
    if not args.no_app:
        import tempfile

        import app

        app.MODEL.set(model, processor)
        app.serve(prevent_thread_lock=True, quiet=True)
        with tempfile.NamedTemporaryFile(suffix=".png") as f:
            render(scene, 324).save(f.name)
            for method in ("full", "elastic"):
                first, words_per_s = app_first_token(app.demo.local_url, f.name, method, args.repeats)
                rows.append(("app first token", method, f"{first:.2f} s"))
                rows.append(("app words/s (whole answer)", method, f"{words_per_s:.1f}"))
        app.demo.close()
    print(f"threads={args.threads} repeats={args.repeats} (median after one warm-up)\n")
    print("| what | method | time |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
