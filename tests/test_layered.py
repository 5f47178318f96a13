"""PrefixKV, VL-Cache and LOOK-M against the naive loop implementation (``naive.run_layered``):
the layers' budgets, kept sets, groups, merged K/V, scores, decode victims and every
layer's length after every forward, batch 1 and 2; and the per-layer budget rule against
exact fractions (the total over layers is ``budget x`` the full cache's)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import elastic
from elastic import budget as budget_rule
from naive import (LAYERED_START, exact_layer_keep, exact_total, greedy_mass_counts, renormalised_counts,
                   run_layered)
from test_cache import generate, llama, prompt  # noqa: F401 (llama is a fixture)
from tiny import tiny_llava

SPANS = {"system": (0, 6), "image": (6, 30), "instruction": (30, 48)}  # a fake image on the text model
CASES = [
    ("prefixkv", dict()),
    ("prefixkv", dict(start_size=2)),
    ("prefixkv", dict(ratios=(1.0, 2.0, 3.0))),
    ("vlcache", dict()),
    ("vlcache", dict(recent_ratio=0.25, threshold=0.05)),
    ("lookm", dict()),
    ("lookm", dict(heads="mean")),
    ("lookm", dict(merge="evict")),
    ("lookm", dict(text_prior=False)),
]


def case_id(case):
    method, options = case
    return method + "".join(f"-{k}={v}" for k, v in options.items())


def minimum_of(method, T, start_size):
    if method != "prefixkv":
        return 1
    sinks = min(start_size, T)
    return sinks + (1 if T - 1 >= sinks else 0) + 1


def check_against_naive(model, ids, method, budget, n, options, spans, prefill_inputs=None, annotations=None):
    B, T = ids.shape
    cache = elastic.make_cache(method, budget=budget, distance=-6, **options)
    cache.annotate(**(annotations or {"spans": spans}))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, **(prefill_inputs or {}))
    tokens, ref = run_layered(model, ids, method, budget, n, distance=-6, spans=spans,
                              prefill_inputs=prefill_inputs, **options)
    assert out[:, T:].tolist() == tokens
    L = len(cache.layers)
    start = options.get("start_size", LAYERED_START[method])
    minimum = minimum_of(method, T, start)

    # The layers' budgets: the naive search's counts, summing to the uniform rule's total.
    lengths = cache.layer_lengths
    assert lengths[0].tolist() == ref["counts"]
    if method != "lookm":  # LOOK-M has one budget for all layers
        assert sum(ref["counts"]) == exact_total(budget, L, T, minimum)
    np.testing.assert_array_equal(lengths, np.array(ref["lengths"]))  # every layer, every forward
    if method != "lookm":  # each layer holds its own ratio k_l / T while decoding
        for s in range(n):
            assert lengths[s].tolist() == [exact_layer_keep(k, T, T + s, minimum) for k in ref["counts"]]
        for s in range(n if budget * T > minimum else 0):  # so the total stays within one entry per layer (plus rounding of k/T) of budget x full
            assert abs(int(lengths[s].sum()) - Fraction(str(budget)) * L * (T + s)) <= L + Fraction(T + s, T)

    for b, trace in enumerate(cache.traces):
        assert trace.budgets_per_layer == (len(set(ref["counts"])) > 1)
        np.testing.assert_array_equal(trace.layer_lengths, lengths)
        heads = trace.heads or [trace]
        per_head = trace.heads is not None
        assert per_head == (method == "lookm" and options.get("heads", "each") == "each")
        for g, head in enumerate(heads):
            pick = (lambda x: x[g]) if per_head else (lambda x: x)
            for l, layer in enumerate(head.layers):
                np.testing.assert_allclose(layer.scores, pick(ref["scores"][b][l]), rtol=1e-4, atol=1e-5)
                assert layer.kept.tolist() == pick(ref["kept"][b][l])
                assert layer.group.tolist() == pick(ref["group"][b][l])
                assert layer.budget_entries == ref["counts"][l] == len(layer.kept)
            expected = sorted((r[0], r[2], r[4]) for r in ref["evictions"] if r[1] == b and (r[3] == g or not per_head))
            assert [tuple(r) for r in head.evictions.tolist()] == expected
        if method != "lookm":
            assert list(trace.layer_budget_entries()) == ref["counts"]
    assert len(ref["evictions"]) > 0  # the decode rule was exercised

    G = cache.layers[0].groups
    for l, layer in enumerate(cache.layers):  # the K/V left at the end, row by row
        keys, values = layer._rows(layer.keys), layer._rows(layer.values)
        ref_k = ref["keys"][l].flatten(0, 1).unflatten(0, (B * G, -1))
        ref_v = ref["values"][l].flatten(0, 1).unflatten(0, (B * G, -1))
        for r in range(keys.shape[0]):
            order = layer.positions[r].argsort()
            torch.testing.assert_close(keys[r][:, order], ref_k[r], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(values[r][:, order], ref_v[r], rtol=1e-4, atol=1e-5)
    return cache, ref


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("batch", [1, 2])
def test_layered_policy_matches_naive_reference(llama, case, batch):
    method, options = case
    check_against_naive(llama, prompt(48, seed=3, batch=batch), method, 0.4, 12, options, SPANS)


@pytest.mark.parametrize("method", ["prefixkv", "vlcache"])
@pytest.mark.parametrize("budget", [0.2, 0.3, 0.7])
def test_layer_budgets_differ_and_sum_to_the_total(llama, method, budget):
    """Low budgets push layers onto their minimum; the total is still met exactly."""
    cache, ref = check_against_naive(llama, prompt(48, seed=1), method, budget, 6, {}, SPANS)
    assert len(set(ref["counts"])) > 1 or budget >= 0.7  # the budgets are not uniform


def test_lookm_on_tiny_llava_with_a_real_image():
    """End to end on a real LVLM prompt: the text prior ranks every image entry after the text."""
    from PIL import Image
    model, processor = tiny_llava(layers=2)
    elastic.attach(model)
    inputs = processor(text=[processor.apply_chat_template(
        [elastic.user_message("what is the colour of the big shape ?", True)], add_generation_prompt=True,
        tokenize=False)], images=[Image.new("RGB", (40, 30), "blue")], return_tensors="pt")
    annotations = elastic.generation.prompt_annotations(model, inputs)
    spans = annotations["spans"]
    assert "image" in spans
    for method in ("lookm", "prefixkv", "vlcache"):
        cache, ref = check_against_naive(model, inputs["input_ids"], method, 0.3, 6, {}, spans,
                                         prefill_inputs={"pixel_values": inputs["pixel_values"]},
                                         annotations=annotations)
        if method == "lookm":
            T, image = inputs["input_ids"].shape[1], set(range(*spans["image"]))
            for head in cache.trace.heads:
                for layer in head.layers:
                    k = layer.budget_entries
                    older = set(range(T - min(k - 1, int(k * 0.5))))  # before the recent window
                    kept = set(layer.kept.tolist()) & older
                    assert (older - image) <= kept or not kept & image  # image only once all older text is in
                    assert kept & image or len(kept) < len(older - image) + 1


def test_vlcache_without_holding_the_budget_grows(llama):
    """VL-Cache as published: compressed once at the prefill, then every token stays."""
    T, n = 48, 10
    held = elastic.make_cache("vlcache", budget=0.3)
    grows = elastic.make_cache("vlcache", budget=0.3, hold_budget=False)
    for cache in (held, grows):
        cache.annotate(spans=SPANS)
        generate(llama, prompt(T, seed=2), cache, n)
    np.testing.assert_array_equal(grows.layer_lengths[0], held.layer_lengths[0])
    for a, b in zip(grows.trace.layers, held.trace.layers):  # the same prefill
        np.testing.assert_array_equal(a.kept, b.kept)
    np.testing.assert_array_equal(grows.layer_lengths, grows.layer_lengths[0] + np.arange(n)[:, None])
    assert len(grows.trace.evictions) == 0 and len(held.trace.evictions) > 0


def test_layer_kv_bytes_follow_per_layer_lengths(llama):
    cache = elastic.make_cache("prefixkv", budget=0.3)
    generate(llama, prompt(48, seed=4), cache, 5)
    per_entry_one_layer = 2 * 2 * 16 * 4  # K+V, kv heads, head dim, float32
    assert cache.kv_bytes() == int(cache.layer_lengths[-1].sum()) * per_entry_one_layer
    assert cache.trace.kv_bytes()[-1] == cache.kv_bytes()


# -- the budget arithmetic, exact ---------------------------------------------------------

@pytest.mark.parametrize("seed", range(20))
def test_mass_threshold_counts_match_the_greedy_loop(seed):
    rng = np.random.default_rng(seed)
    L, n = int(rng.integers(1, 6)), int(rng.integers(1, 30))
    masses = [rng.exponential(size=n) ** rng.uniform(1, 4) for _ in range(L)]
    forced = int(rng.integers(0, 3))
    minimum = forced + int(rng.integers(1, 4))
    total = int(rng.integers(L * min(minimum, n + forced), L * (n + forced) + 1))
    assert budget_rule.mass_threshold_counts(masses, total, minimum, forced) == \
        greedy_mass_counts([m.tolist() for m in masses], total, minimum, forced)


@pytest.mark.parametrize("seed", range(20))
def test_distribute_matches_clamp_and_renormalise(seed):
    rng = np.random.default_rng(seed)
    L, T = int(rng.integers(1, 8)), int(rng.integers(2, 60))
    weights = (rng.uniform(size=L) ** 3).tolist()
    lo = int(rng.integers(1, T // 2 + 1))
    total = int(rng.integers(L * lo, L * T + 1))
    counts = budget_rule.distribute(total, weights, lo, T)
    assert sum(counts) == total and all(lo <= c <= T for c in counts)
    assert counts == renormalised_counts(total, weights, lo, T)


def test_distribute_by_hand():
    assert budget_rule.distribute(20, [1, 2, 3, 100], 2, 10) == [2, 3, 5, 10]  # 10 is the cap; 10 left in 1:2:3 -> 1.67, 3.33, 5
    assert budget_rule.distribute(9, [0, 0, 0], 1, 5) == [3, 3, 3]  # no weights: even
    assert budget_rule.mass_threshold_counts([[3, 1], [4, 0]], 3, 0) == [2, 1]


def test_full_size_total_stays_within_two_percent():
    """LLaVA-1.5-7B-like: 32 layers, a 900-token prompt, 512 decode steps, uneven layer
    budgets: the total after every step is within 2% of ``budget x`` the full cache's."""
    rng = np.random.default_rng(0)
    L, T = 32, 900
    for b in (0.1, 0.2, 0.5):
        minimum = 6
        total = budget_rule.layer_total(b, T, L, minimum)
        assert total == math.ceil(Fraction(str(b)) * L * T)
        counts = budget_rule.distribute(total, rng.uniform(0.05, 1.0, L), minimum, T)
        for tokens in range(T, T + 513, 16):
            held = sum(budget_rule.keep_count(budget_rule.layer_ratio(k, T), tokens, minimum) for k in counts)
            assert abs(held / (b * L * tokens) - 1) < 0.02


@pytest.mark.parametrize("method,params,match", [
    ("prefixkv", dict(ratios=()), "ratios must be"),
    ("prefixkv", dict(ratios=(1.0, -1.0)), "ratios must be"),
    ("vlcache", dict(recent_ratio=1.5), "recent_ratio must be in"),
    ("vlcache", dict(threshold=-0.1), "threshold must be in"),
    ("vlcache", dict(window=0), "window must be an integer >= 1"),
    ("vlcache", dict(hold_budget="yes"), "hold_budget must be True or False"),
    ("lookm", dict(merge="average"), "merge must be one of"),
    ("lookm", dict(heads="some"), "heads must be one of"),
    ("lookm", dict(text_prior="yes"), "text_prior must be True or False"),
])
def test_bad_options_raise(method, params, match):
    with pytest.raises(ValueError, match=match):
        elastic.make_cache(method, **params)


def test_ratios_for_another_depth_are_refused(llama):
    cache = elastic.make_cache("prefixkv", budget=0.4, ratios=(1.0, 1.0))
    with pytest.raises(ValueError, match="ratios has 2 layers, the model 3"):
        generate(llama, prompt(40), cache, 2)
