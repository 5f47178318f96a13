"""Smoke test of the shared timing code (elastic.benchmark) and the overhead bench's checks."""

import math
import sys
from pathlib import Path

import pytest
import torch

from elastic import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_overhead  # noqa: E402


@pytest.fixture(scope="module")
def model():
    from elastic.scoring import attach

    return attach(benchmark.random_llama("random-tiny"))


def test_measure_forces_tokens_and_counts_kv_bytes(model):
    T, N, B = 40, 5, 2
    inputs = benchmark.input_maker(model, None, T, image=False)(B)
    cfg = model.config
    # Independent: K and V, every layer, every KV head, float32, for each token fed (T + N - 1).
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    seen = T + N - 1
    cases = [("full", 1.0, "DynamicCache"), ("full", 1.0, "preallocated"), ("elastic", 0.3, "preallocated"),
             ("elastic", 0.3, "dynamic"), ("h2o", 0.3, "preallocated"), ("local", 0.5, "preallocated")]
    for method, budget, layout in cases:
        m = benchmark.measure(model, inputs, method, budget, N, layout=layout)
        assert (m.batch, m.prompt_tokens, m.new_tokens, m.layout) == (B, T, N, layout)
        assert m.kv_full_bytes == per_token * seen * B
        assert m.kv_bytes == per_token * B * math.ceil(budget * seen - 1e-9)
        assert 0 < m.prefill_s < m.latency_s and 0 < m.decode_s < m.latency_s
        assert m.throughput == pytest.approx(B * N / m.latency_s)


@pytest.mark.parametrize("method,layout,match", [("elastic", "DynamicCache", "full"), ("full", "ring", "layout")])
def test_measure_rejects_bad_layouts(model, method, layout, match):
    inputs = benchmark.input_maker(model, None, 8, image=False)(1)
    with pytest.raises(ValueError, match=match):
        benchmark.measure(model, inputs, method, 1.0, 2, layout=layout)


def test_peak_memory_sees_a_large_allocation():
    with benchmark.PeakMemory("cpu") as meter:
        block = torch.ones(64 * 2**20 // 4)  # 64 MB, written so the pages are resident
        del block
    assert meter.peak_bytes > 48 * 2**20


def test_suite_table_and_targets(model):
    make = benchmark.input_maker(model, None, 198, image=False)  # 198 + 3 - 1 = 200 tokens seen
    results = benchmark.run_suite(model, make, [1], benchmark.configs(["elastic"], [0.2, 0.5]), 3, progress=None)
    assert [(m.label, m.budget) for m in results] == [("full (DynamicCache)", 1.0), ("full", 1.0),
                                                      ("elastic", 0.2), ("elastic", 0.5)]
    baseline = benchmark.full_baseline(results)[1]
    assert baseline.latency_s == min(m.latency_s for m in results[:2])  # the faster full cache
    table = benchmark.format_table(results).splitlines()
    assert len(table) == 2 + 4 and "| full (DynamicCache) | 1 |" in table[2] and "| full | 1 |" in table[3]
    assert table[2 + results.index(baseline)].count("1.00x") == 3
    checks = bench_overhead.check_targets(results)
    assert sum("prefill" in text for _, text in checks) == 2  # elastic at both budgets
    assert sum("decode" in text for _, text in checks) == 1  # elastic at 0.2
    assert all(met and "+0.00%" in text for met, text in checks if "KV bytes" in text)  # 40 and 100 of 200
