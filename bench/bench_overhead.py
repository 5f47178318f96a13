"""Overhead of the compressing caches on a random ~110M Llama (issue 2), with target checks.

    PYTHONPATH=. python bench/bench_overhead.py                       # 1024 + 256, batch 1 and 4
    PYTHONPATH=. python bench/bench_overhead.py --model random-tiny --prompt 64 --new 16

Full / elastic / h2o / local at budgets 0.2 and 0.5, side by side in one run, timed by
:func:`elastic.benchmark.measure` (the same code as ``python -m elastic.benchmark``).
Targets, checked per batch size:

* Elastic's prefill (scoring + merging included) takes at most 1.3x the full prefill;
* Elastic's decode throughput at budget 0.2 is at least the full cache's;
* KV bytes at budget b are within 2% of b times the full cache's.
"""

from __future__ import annotations

import argparse
import sys

from elastic import benchmark

PREFILL_LIMIT = 1.3
KV_TOLERANCE = 0.02


def check_targets(results: list[benchmark.Measurement]) -> list[tuple[bool, str]]:
    """``(met, description)`` for every target and batch size."""
    checks = []
    full = benchmark.full_baseline(results)  # the faster of DynamicCache and the preallocated full cache
    for m in results:
        f = full[m.batch]
        tag = f"batch {m.batch} {m.method} {m.budget:g}"
        if m.method == "elastic":
            ratio = m.prefill_s / f.prefill_s
            checks.append((ratio <= PREFILL_LIMIT, f"{tag}: prefill {ratio:.2f}x full (target <= {PREFILL_LIMIT}x)"))
        if m.method == "elastic" and abs(m.budget - 0.2) < 1e-9:
            ratio = m.decode_tps / f.decode_tps
            checks.append((ratio >= 1.0, f"{tag}: decode {ratio:.2f}x full tokens/s (target >= 1.00x)"))
        if m.method != "full":
            error = m.kv_bytes / (m.budget * f.kv_bytes) - 1
            checks.append((abs(error) <= KV_TOLERANCE,
                           f"{tag}: KV bytes {m.kv_bytes / f.kv_bytes:.4f} of full, {error:+.2%} off b x full "
                           f"(target within {KV_TOLERANCE:.0%})"))
    return checks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    benchmark.add_common_args(ap, batch=[1, 4], prompt=1024, new=256, budgets=[0.2, 0.5])
    args = ap.parse_args(argv)
    results = benchmark.run_from_args(args)
    checks = check_targets(results)
    print()
    for met, text in checks:
        print(("MET   " if met else "MISSED") + " " + text)
    return 0 if all(met for met, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
