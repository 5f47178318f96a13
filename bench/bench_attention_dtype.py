"""Would a bfloat16 K/V store bring the decode step under issue 16's 1.1x target?

    ./run.sh python bench/bench_attention_dtype.py --threads 2

Times what reading the kept K/V costs in bench_decode_floor.py's configuration (random-100m:
12 layers, 12 KV heads of 64; batch 8; budget 0.2 of a 1024-token prompt, 205 kept
entries): one ``scaled_dot_product_attention`` per layer for a single new query, with the
K/V in float32 and in bfloat16 (the query cast to bfloat16, the output back to float32).
Prints the fastest of ``--repeats`` passes over the 12 layers.
"""

import argparse
import time

import torch
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--kept", type=int, default=205)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    layers, heads, dim = 12, 12, 64
    query = torch.randn(args.batch, heads, 1, dim)
    print("| K/V dtype | K/V read (MB) | ms for 12 layers |\n|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        keys = [torch.randn(args.batch, heads, args.kept, dim, dtype=dtype) for _ in range(layers)]
        values = [torch.randn(args.batch, heads, args.kept, dim, dtype=dtype) for _ in range(layers)]
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            for k, v in zip(keys, values):
                F.scaled_dot_product_attention(query.to(dtype), k, v).to(torch.float32)
            best = min(best, time.perf_counter() - start)
        megabytes = sum(t.numel() * t.element_size() for t in keys + values) / 1e6
        print(f"| {str(dtype).removeprefix('torch.')} | {megabytes:.0f} | {best * 1e3:.2f} |")


if __name__ == "__main__":
    main()
