"""Where a decode step of SmolLM2-135M-Instruct goes on this CPU (the numbers behind
docs/embedded-model.md, "Speed").

    ./run.sh python docs/embedded-experiments/decode_profile.py --threads 2
    ./run.sh python docs/embedded-experiments/decode_profile.py --threads 2 --compile-layers

The language model alone (no image, no cache policy), a 118-token prompt, then one token at
a time through a ``DynamicCache``:

* the mean time of a decode step, eager or with every decoder layer ``torch.compile``d;
* the torch profiler over 10 steps: CPU time in ``aten::mm`` (the weight products) against
  all CPU time;
* one-row products of SmolLM2's shapes with float32, bfloat16 and int8 weights (the kernel
  of ``elastic.quantize``), each weight hot in the cache: what the kernels cost apart from
  reading memory.

Results (2026-12-02, 07:56, 2 threads, nothing else running; about 25 s a run): a step
72.3 ms eager and 73.4 ms with compiled layers; the profiler: 346 ms of ``aten::mm`` in 626
ms of CPU time (eager), 331 of 603 (compiled); one-row products 576 -> 1536: float32 74 us,
bfloat16 137 us, int8 weights (bfloat16 activations) 54 us, int8 weights with float32
activations 854 us. Earlier the same day, in throwaway scripts on the shipped model's
language model (same shapes): 49-60 ms per eager step, 53 ms compiled, 290 ms of mm in 517.
"""

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from elastic.embedded import language_model_dir


def step_ms(lm, steps: int = 40) -> float:
    with torch.no_grad():
        cache = DynamicCache()
        lm(input_ids=torch.randint(0, 1000, (1, 118)), past_key_values=cache, use_cache=True)
        token = torch.tensor([[5]])
        for _ in range(5):  # warm-up (and compilation)
            lm(input_ids=token, past_key_values=cache, use_cache=True)
        start = time.perf_counter()
        for _ in range(steps):
            lm(input_ids=token, past_key_values=cache, use_cache=True)
        return (time.perf_counter() - start) / steps * 1000


def mm_share(lm) -> tuple[float, float]:
    from torch.profiler import profile

    with torch.no_grad():
        cache = DynamicCache()
        lm(input_ids=torch.randint(0, 1000, (1, 118)), past_key_values=cache, use_cache=True)
        token = torch.tensor([[5]])
        with profile() as prof:
            for _ in range(10):
                lm(input_ids=token, past_key_values=cache, use_cache=True)
    events = prof.key_averages()
    mm = sum(e.self_cpu_time_total for e in events if e.key == "aten::mm") / 1000
    return mm, sum(e.self_cpu_time_total for e in events) / 1000


def product_us(fn, n: int = 2000) -> float:
    for _ in range(50):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def products():
    for k, n in ((576, 1536), (1536, 576), (576, 576)):
        w, x = torch.randn(n, k), torch.randn(1, k)
        scale = w.abs().amax(1) / 127
        w8 = (w / scale[:, None]).round().to(torch.int8)
        wb, xb, sb = w.bfloat16(), x.bfloat16(), scale.bfloat16()
        row = {"float32": product_us(lambda: torch.nn.functional.linear(x, w)),
               "bfloat16": product_us(lambda: torch.nn.functional.linear(xb, wb)),
               "int8 weights": product_us(lambda: torch.ops.aten._weight_int8pack_mm(xb, w8, sb)),
               "int8 weights, float32 activations": product_us(
                   lambda: torch.ops.aten._weight_int8pack_mm(x, w8, scale), 200)}
        print(f"one row {k} -> {n}: " + ", ".join(f"{name} {us:.0f} us" for name, us in row.items()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile-layers", action="store_true", help="torch.compile every decoder layer")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = AutoModelForCausalLM.from_pretrained(language_model_dir(), dtype=torch.float32).model.eval()
    if args.compile_layers:
        for layer in lm.layers:
            layer.forward = torch.compile(layer.forward)
    print(f"decode step ({'compiled layers' if args.compile_layers else 'eager'}): {step_ms(lm):.1f} ms")
    mm, total = mm_share(lm)
    print(f"profiler, 10 steps: aten::mm {mm:.0f} ms of {total:.0f} ms CPU time")
    products()


if __name__ == "__main__":
    main()
