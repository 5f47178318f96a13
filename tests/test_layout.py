"""The preallocated layout (the default) against the dynamic one: same tokens, same traces,
the budget rule at every step, and decode steps that never reallocate the cache."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import elastic
from naive import exact_keep, exact_layer_keep, exact_total
from test_cache import llama, prompt  # noqa: F401 (llama is a fixture)
from tiny import tiny_llava

BUDGETS = [0.1, 0.2, 0.3, 0.5, 0.7, 1.0]
CASES = [("full", 1.0)] + [(m, b) for m in elastic.METHODS if m != "full" for b in BUDGETS]
MINIMUM = {"elastic": 3, "local": 2, "h2o": 1, "snapkv": 1, "tova": 1, "h2o-ref": 2, "full": 1,
           "prefixkv": 3, "vlcache": 1, "lookm": 1}  # protected + 1 (start_size=1)


def prompts(T=40, batch=2, seed=0):
    return prompt(T, seed, batch)


def generate(model, ids, cache, n):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=n,
                              min_new_tokens=n, do_sample=False)


def assert_same_traces(a: elastic.PolicyCache, b: elastic.PolicyCache):
    for ta, tb in zip(a.traces, b.traces, strict=True):
        assert ta.lengths == tb.lengths and ta.tokens_seen == tb.tokens_seen
        assert ta.fixed_point == tb.fixed_point and ta.bytes_per_entry == tb.bytes_per_entry
        np.testing.assert_array_equal(ta.evictions, tb.evictions)
        for la, lb in zip(ta.layers, tb.layers, strict=True):
            np.testing.assert_array_equal(la.kept, lb.kept)
            np.testing.assert_array_equal(la.group, lb.group)
            if la.scores is not None:
                np.testing.assert_array_equal(la.scores, lb.scores)


@pytest.mark.parametrize("method,budget", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_layouts_generate_the_same_tokens_and_traces(llama, method, budget, seed):
    """Batch 2 (H2O evicts a different slot per sample), a fixed point inside the prompt
    (distance -5), and a reserve of 4 so the buffers also grow mid-generation."""
    T, n = 40, 24
    ids = prompts(T, seed=seed)
    params = dict(budget=budget, start_size=1, distance=-5)
    dynamic = elastic.make_cache(method, layout="dynamic", **params)
    prealloc = elastic.make_cache(method, layout="preallocated", reserve=4, **params)
    out = generate(llama, ids, dynamic, n)
    assert torch.equal(generate(llama, ids, prealloc, n), out)
    assert_same_traces(dynamic, prealloc)
    rate = 1.0 if method == "full" else budget
    expected = [exact_keep(rate, T + s, MINIMUM[method]) for s in range(n)]
    if dynamic.policy.budgets_per_layer:  # every layer holds its own ratio k_l / T
        kept = dynamic.layer_lengths[0].tolist()
        assert sum(kept) == exact_total(budget, len(kept), T, MINIMUM[method])
        np.testing.assert_array_equal(dynamic.layer_lengths, prealloc.layer_lengths)
        expected = [np.mean([exact_layer_keep(k, T, T + s, MINIMUM[method]) for k in kept]) for s in range(n)]
        expected = [int(e) if float(e).is_integer() else float(e) for e in expected]
    if method == "h2o-ref" and T - expected[0] > 1:  # its rank-position selection keeps one entry less
        expected[0] -= 1
        expected = [min(e, expected[0] + s) for s, e in enumerate(expected)]
    assert dynamic.lengths == prealloc.lengths == expected  # the budget rule after every forward
    assert prealloc.kv_bytes() == dynamic.kv_bytes()
    for a, b in zip(dynamic.layers, prealloc.layers):  # the same entries, in some slot order
        order = b.positions.argsort(dim=1)
        assert torch.equal(b.positions.gather(1, order), a.positions)
        bk, bv = b._rows(b.keys), b._rows(b.values)  # one row per (sample, KV head) if per head
        index = order[:, None, :, None].expand_as(bk)
        torch.testing.assert_close(bk.gather(2, index), a._rows(a.keys), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bv.gather(2, index), a._rows(a.values), rtol=1e-5, atol=1e-6)


def test_the_window_is_a_ring(llama):
    """Evicting by slot reuse really permutes the slots (so the test above compares two
    different layouts), and the slots past the fixed point are the window."""
    ids = prompts(40, batch=1)
    cache = elastic.make_cache("elastic", budget=0.3, distance=-5)
    generate(llama, ids, cache, 24)
    layer, n_tl = cache.layers[0], cache.trace.fixed_point
    positions = layer.positions[0]
    assert len(cache.trace.evictions) > 0
    assert not bool((positions[1:] > positions[:-1]).all())  # not in position order
    assert positions[:n_tl].tolist() == cache.trace.layers[0].kept[:n_tl].tolist()  # the head never moves
    window = sorted(positions[n_tl:].tolist())
    assert window == list(range(window[0], 40 + 23))  # the most recent tokens, contiguous


def test_vlm_layouts_agree():
    model, processor = tiny_llava(layers=2)
    elastic.attach(model)
    from PIL import Image

    text = processor.apply_chat_template([elastic.user_message("what is the colour ?", True)],
                                         add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[Image.new("RGB", (40, 30), "red")], return_tensors="pt")
    caches = {layout: elastic.make_cache("elastic", budget=0.3, layout=layout) for layout in elastic.LAYOUTS}
    with torch.no_grad():
        outs = [model.generate(**inputs, cache=c, max_new_tokens=12, min_new_tokens=12, do_sample=False)
                for c in caches.values()]
    assert torch.equal(outs[0], outs[1])
    assert_same_traces(*caches.values())


def test_h2o_victim_ignores_slot_order():
    """In a permuted layer, H2O evicts the lowest score outside the recent window, a tie
    going to the oldest entry (as the first slot of a position-ordered layer would)."""
    layer = SimpleNamespace(positions=torch.tensor([[5, 0, 9, 3, 7, 1]]),
                            accumulated=torch.tensor([[0.2, 0.5, 0.1, 0.2, 0.0, 0.3]]),
                            capacity=lambda: 5, get_seq_length=lambda: 6)
    layer.slot_of_rank = lambda rank: elastic.PreallocatedLayer.slot_of_rank(layer, rank)
    # capacity 5: a recent window of 2 (positions 9 and 7, whatever their scores); among
    # positions 0, 1, 3, 5 the lowest score 0.2 is held by 5 (slot 0) and 3 (slot 3).
    assert elastic.H2OPolicy(budget=0.5).decode_victim(layer).tolist() == [3]


def buffer_addresses(model, cache, ids, n):
    """``(keys.data_ptr(), values.data_ptr())`` of every layer after every forward."""
    seen = []
    hook = model.register_forward_hook(
        lambda *_: seen.append([(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers]))
    try:
        generate(model, ids, cache, n)
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize("method", elastic.METHODS)
def test_decode_steps_do_not_reallocate(llama, method):
    n = 20
    cache = elastic.make_cache(method, budget=0.3, distance=-5, reserve=n)
    seen = buffer_addresses(llama, cache, prompts(40), n)
    assert len(seen) == n  # the prefill and n - 1 decode steps
    assert all(step == seen[0] for step in seen[1:])
    if method != "full":
        assert cache.lengths[-1] < cache.lengths[0] + n - 1  # it did evict meanwhile
    # The control: the dynamic layout allocates new tensors at every step (malloc may hand
    # a freed block back now and then, so only most steps are seen to move).
    dynamic = buffer_addresses(llama, elastic.make_cache(method, budget=0.3, distance=-5, layout="dynamic"),
                               prompts(40), n)
    assert sum(a != b for a, b in zip(dynamic[1:], dynamic[2:])) >= (n - 2) // 2


def test_buffers_are_sized_from_the_budget_rule(llama):
    T, n, budget, reserve = 40, 10, 0.3, 16
    cache = elastic.make_cache("local", budget=budget, reserve=reserve)
    generate(llama, prompts(T), cache, n)
    slots = exact_keep(budget, T + reserve, 2) + 1  # room for `reserve` tokens, plus the spare slot
    layer = cache.layers[0]
    assert layer.slots == slots
    per_slot = layer.keys[:, :, :1].numel() * 4 * 2  # K + V, float32
    assert cache.allocated_bytes() == len(cache.layers) * slots * per_slot
    assert cache.kv_bytes() == len(cache.layers) * cache.lengths[-1] * per_slot


@pytest.mark.parametrize("kwargs,match", [
    (dict(layout="ring"), "unknown layout"),
    (dict(reserve=-1), "reserve"),
    (dict(reserve=2.5), "reserve"),
])
def test_bad_layout_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        elastic.make_cache("elastic", **kwargs)


@pytest.mark.parametrize("options", [
    dict(scope="head"), dict(scope="shared"), dict(prefill="kmeans"), dict(decode="lowest-frequency"),
    dict(decode="recent", importance="uniform"),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_elastic_variants_agree_across_layouts(llama, options):
    """Batch 2, so per-head rows and per-sample victims differ inside one batch."""
    T, n = 40, 20
    ids = prompts(T, seed=2)
    caches = [elastic.make_cache("elastic", budget=0.3, distance=-5, layout=layout, reserve=4, **options)
              for layout in elastic.LAYOUTS]
    outs = [generate(llama, ids, c, n) for c in caches]
    assert torch.equal(outs[0], outs[1])
    assert_same_traces(*caches)
    assert caches[0].lengths == [exact_keep(0.3, T + s, MINIMUM["elastic"]) for s in range(n)]
