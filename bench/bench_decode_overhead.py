"""Per-step overhead of the compressed caches at the shipped model's short prompt (issue 32, item 6).

    ./run.sh python bench/bench_decode_overhead.py                        # 64 tokens, 5 rounds, 2 threads
    ./run.sh python bench/bench_decode_overhead.py --new 16 --repeats 1   # a smoke run, about a minute

At 118 prompt tokens the 538 MB of weights dominate a decode step, so a compressed cache
cannot be faster than the full one; what it can be is slower, by the policy's own work per
step (scoring, the eviction, Python per layer). This bench measures that cost side by side.

One example scene of ``assets/examples`` (the first: "Is the purple diamond large or small?") is
answered greedily with EOS off, so every run writes exactly ``--new`` tokens, by
``model.generate`` with each cache:

* ``full (DynamicCache)``: transformers' own cache (a ``torch.cat`` per step), no policy;
* ``full``: this library's full-cache policy (preallocated layout), what the app's "Full"
  runs;
* ``elastic``, ``local``, ``h2o``, ``tova``, ``snapkv`` at ``--budget`` (preallocated layout,
  as :func:`elastic.generate` makes them, ``reserve=--new``).

A forward hook marks the end of every forward, so the decode phase (forward 2 to the last)
is timed apart from the prefill: decode tokens/s = decode steps / their wall time. Every
cache runs once to warm up, then ``--repeats`` rounds run each cache once, in an order that
rotates every round (a slow spell of a shared machine hits all alike; position in the round
cancels). ``--clock cpu`` times the process's CPU time instead of the wall clock: on a
machine shared with other jobs it measures the work of a step, not the waits for a core
(with ``--threads 1``). The table gives each method's median tokens/s and its ratio to both full rows,
paired within a round: the median ratio and its min / max over the rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import elastic
from elastic import benchmark
from elastic.generation import build_inputs, load_image, user_message

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
METHODS = ("full", "elastic", "local", "h2o", "tova", "snapkv")
DYNAMIC = "full (DynamicCache)"


def example_inputs(model, processor, index: int):
    """Model inputs and prompt annotations of example scene ``index``."""
    example = json.loads((EXAMPLES / "examples.json").read_text())[index]
    image = load_image(EXAMPLES / example["image"])
    inputs, annotations = build_inputs(model, processor, [user_message(example["prompt"], True)], image)
    return inputs, annotations, example


def make(name: str, budget: float, new: int, annotations: dict):
    """A fresh cache for one run (``new`` decode tokens of room, as elastic.generate reserves)."""
    if name == DYNAMIC:
        return DynamicCache()
    cache = elastic.make_cache(name, budget=1.0 if name == "full" else budget, reserve=new)
    cache.annotate(**annotations)
    return cache


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def decode_rate(model, inputs, cache, new: int, clock=time.perf_counter) -> float:
    """Decode tokens/s of one greedy run forced to ``new`` tokens (prefill excluded)."""
    marks = []
    handle = model.register_forward_hook(lambda *_: marks.append(clock()))
    try:
        with torch.inference_mode():
            out = model.generate(**inputs, cache=cache, max_new_tokens=new, do_sample=False)
    finally:
        handle.remove()
    generated = out.shape[1] - inputs["input_ids"].shape[1]
    if generated != new or len(marks) != new:
        raise RuntimeError(f"expected {new} tokens and forwards, got {generated} and {len(marks)}")
    return (len(marks) - 1) / (marks[-1] - marks[0])


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    model, processor = elastic.load_model(device="cpu")
    inputs, annotations, example = example_inputs(model, processor, args.example)
    names = [DYNAMIC, *args.methods]
    clock = CLOCKS[args.clock]
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None  # exactly --new tokens for every cache
    rates = {name: [] for name in names}
    try:
        for name in names:  # warm-up
            decode_rate(model, inputs, make(name, args.budget, args.new, annotations), args.new, clock)
        for r in range(args.repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                cache = make(name, args.budget, args.new, annotations)
                rates[name].append(decode_rate(model, inputs, cache, args.new, clock))
    finally:
        model.generation_config.eos_token_id = eos
    return dict(prompt_tokens=inputs["input_ids"].shape[1], example=example["image"], prompt=example["prompt"],
                new=args.new, budget=args.budget, threads=args.threads, repeats=args.repeats, clock=args.clock,
                machine=benchmark.machine(), rates=rates)


def ratio_stats(rates: list[float], base: list[float]) -> tuple[float, float, float]:
    """Median, min and max of the per-round ratios ``rates[r] / base[r]``."""
    ratios = [a / b for a, b in zip(rates, base)]
    return statistics.median(ratios), min(ratios), max(ratios)


def format_table(result: dict) -> str:
    rates = result["rates"]
    budget = result["budget"]
    lines = ["| cache | budget | decode tok/s (median) | min - max | / full (median, min - max) "
             "| / DynamicCache (median, min - max) |",
             "|---|---|---|---|---|---|"]
    for name, values in rates.items():
        b = 1 if name in (DYNAMIC, "full") else budget
        cells = []
        for base in ("full", DYNAMIC):
            if base not in rates:
                cells.append("-")
                continue
            med, lo, hi = ratio_stats(values, rates[base])
            cells.append(f"{med:.3f} ({lo:.3f} - {hi:.3f})")
        lines.append(f"| {name} | {b:g} | {statistics.median(values):.2f} | {min(values):.2f} - {max(values):.2f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new", type=int, default=64, help="decode tokens per run (EOS off)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds after one warm-up run each")
    ap.add_argument("--budget", type=float, default=0.5, help="budget of the compressed caches (the app's default)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall: elapsed time (what a user waits); cpu: CPU time of the process, which other "
                         "jobs on a shared machine barely move (use it with --threads 1: with 2 threads it also "
                         "counts the threads' spin-waiting)")
    ap.add_argument("--example", type=int, default=0, help="index into assets/examples/examples.json")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=elastic.METHODS,
                    help="policy caches to time (full DynamicCache is always timed)")
    ap.add_argument("--json", default=None, help="also write the raw rates here")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    result = run(args)
    result["seconds"] = time.perf_counter() - start
    print(f"shipped model, example {args.example} ({result['example']}: {result['prompt']!r}), "
          f"{result['prompt_tokens']} prompt tokens + {args.new} new, budget {args.budget:g}, "
          f"{args.repeats} interleaved rounds after a warm-up, {args.clock} clock, on {result['machine']}; {result['seconds']:.0f} s")
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
