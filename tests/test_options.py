"""Every combination of every method's options runs, keeps the budget at every step and
makes the naive loop implementation's decisions (``naive.run`` / ``naive.run_layered``):
Elastic's whole grid (importance x scope x prefill x decode x protect, 540 runs) and a
grid of each other method's options, on one tiny Llama with a 16-token prompt."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import elastic
import naive
from elastic.budget import share_count
from test_policies import assert_same_decisions
from elastic.policies import Decode, elastic_cache
from naive import exact_keep, exact_layer_keep, exact_total, protected_of, run, run_layered
from tiny import tiny_llama

T, NEW, BUDGET, DISTANCE = 16, 4, 0.4, -2  # 7 entries kept; an eviction at decode steps 1 and 3
# A fake image and instruction on the text model, for the span-reading options.
SPANS = {"system": (0, 2), "image": (2, 10), "instruction": (11, 14)}
PROTECT_LAST = 3


@pytest.fixture(scope="module")
def llama():
    model = elastic.attach(tiny_llama(layers=2, heads=4, kv_heads=2, hidden=32, sharpness=30.0))
    # The naive runs' eager copies of the weights, made once here (not once per run: 600 runs).
    eager, eager_any_length = naive.eager_copy(model), naive._eager_any_length(model)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(naive, "eager_copy", lambda _: eager)
        patch.setattr(naive, "_eager_any_length", lambda _: eager_any_length)
        yield model


@pytest.fixture(scope="module")
def ids():
    return torch.randint(4, 64, (1, T), generator=torch.Generator().manual_seed(5))


def generate(model, ids, method, layout="preallocated", **options):
    cache = elastic.make_cache(method, budget=BUDGET, distance=DISTANCE, layout=layout, **options)
    cache.annotate(spans=SPANS)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=NEW,
                             min_new_tokens=NEW, do_sample=False)
    return out[0, T:].tolist(), cache


# ---------------------------------------------------------------- Elastic's whole grid

GRID = list(itertools.product(elastic_cache.IMPORTANCE, elastic_cache.SCOPES, elastic_cache.PREFILLS,
                              elastic_cache.DECODES, elastic_cache.PROTECTS))


@pytest.mark.parametrize("combo", GRID, ids=["-".join(c) for c in GRID])
def test_every_elastic_option_combination(llama, ids, combo):
    importance, scope, prefill, decode, protect = combo
    options = dict(importance=importance, scope=scope, prefill=prefill, decode=decode, protect=protect,
                   protect_last=PROTECT_LAST)
    layout = elastic.LAYOUTS[GRID.index(combo) % 2]  # both layouts over the grid (they agree: test_layout)
    tokens, cache = generate(llama, ids, "elastic", layout, **options)
    # The budget at every step: ceil(budget x tokens seen), never below the protected entries plus one.
    minimum = len(protected_of("elastic", T, 1, protect, PROTECT_LAST, SPANS)) + 1
    expected = [[exact_keep(BUDGET, T + s, minimum)] * len(cache.layers) for s in range(NEW)]
    assert cache.layer_lengths.tolist() == expected
    ref_tokens, ref = run(llama, ids, "elastic", BUDGET, NEW, distance=DISTANCE, spans=SPANS, **options)
    assert_same_decisions(cache, tokens, ref_tokens, ref, per_head=scope == "head")
    assert ref["evictions"]  # the decode rule was exercised


def test_uniform_importance_with_lowest_frequency_starts_every_entry_equal(llama, ids):
    """No prefill score: every kept entry starts decoding at 0, so the first victim is the
    entry the first decode step attended to least (a sink never goes), as the naive run."""
    tokens, cache = generate(llama, ids, "elastic", importance="uniform", decode="lowest-frequency")
    for layer in cache.layers:
        assert layer.prefill_scores is None and layer.accumulated is not None
    ref_tokens, ref = run(llama, ids, "elastic", BUDGET, NEW, distance=DISTANCE, spans=SPANS,
                          importance="uniform", decode="lowest-frequency")
    assert_same_decisions(cache, tokens, ref_tokens, ref, per_head=False)
    assert all(position >= 1 for _, _, position in ref["evictions"])


# ---------------------------------------------------------------- the other methods' options

PEERS = (
    [("full", {}), ("h2o-ref", {}), ("h2o-ref", dict(start_size=3))]
    + [("local", dict(start_size=s)) for s in (0, 1, 4)]
    + [("h2o", dict(recent_ratio=r)) for r in (0.0, 0.25, 0.5, 1.0)]
    + [("tova", dict(heads=h)) for h in ("mean", "each")]
    + [("snapkv", dict(window=w, kernel=k, pooling=p, heads=h))
       for w, k, p, h in itertools.product((1, 5, 32), (1, 3), ("avg", "max"), ("each", "mean"))]
)


def peer_id(case):
    method, options = case
    return method + "".join(f"-{k}={v}" for k, v in options.items())


@pytest.mark.parametrize("case", PEERS, ids=peer_id)
def test_every_peer_option_combination(llama, ids, case):
    method, options = case
    tokens, cache = generate(llama, ids, method, **options)
    start = options.get("start_size", 1)
    if method == "full":
        assert cache.layer_lengths[:, 0].tolist() == [T + s for s in range(NEW)]
        assert tokens == run(llama, ids, "full", 1.0, NEW)[0]
        return
    minimum = len(protected_of(method, T, start)) + 1
    expected = [exact_keep(BUDGET, T + s, minimum) for s in range(NEW)]
    if method == "h2o-ref":  # its rank-position selection keeps one entry under the budget
        expected = [min(e, expected[0] - 1 + s) for s, e in enumerate(expected)]
    assert cache.layer_lengths.tolist() == [[e] * len(cache.layers) for e in expected]
    ref_tokens, ref = run(llama, ids, method, BUDGET, NEW, distance=DISTANCE, spans=SPANS,
                          **{"start_size": start, **options})
    per_head = options.get("heads", "each" if method == "snapkv" else "mean") == "each"
    assert_same_decisions(cache, tokens, ref_tokens, ref, per_head)
    assert ref["evictions"]


LAYERED = (
    [("prefixkv", dict(ratios=r, start_size=s)) for r in (None, (1.0, 3.0)) for s in (1, 4)]
    + [("vlcache", dict(recent_ratio=r, window=w, threshold=t, min_ratio=m, hold_budget=h))
       for r, w, (t, m), h in itertools.product((0.0, 0.25), (4, 32), ((0.01, 0.01), (0.2, 0.3)), (True, False))]
    + [("lookm", dict(text_prior=p, merge=m, heads=h, recent_ratio=r))
       for p, m, h, r in itertools.product((True, False), ("pivot", "evict"), ("each", "mean"), (0.25, 0.5))]
)


@pytest.mark.parametrize("case", LAYERED, ids=peer_id)
def test_every_layered_option_combination(llama, ids, case):
    method, options = case
    tokens, cache = generate(llama, ids, method, **options)
    naive_options = {**options, "hold_budget": True} if method == "vlcache" else options
    ref_tokens, ref = run_layered(llama, ids, method, BUDGET, NEW, distance=DISTANCE, spans=SPANS, **naive_options)
    lengths, L = cache.layer_lengths, len(cache.layers)
    assert lengths[0].tolist() == ref["counts"]  # the layers' budgets, as the naive search sets them
    minimum = 1
    if method == "prefixkv":
        start = options["start_size"]
        minimum = len(set(range(start)) | {T - 1}) + 1
    if method != "lookm":  # all layers together keep ceil(budget x layers x T)
        assert sum(ref["counts"]) == exact_total(BUDGET, L, T, minimum)
    trace = cache.trace
    heads = trace.heads or [trace]
    assert (trace.heads is not None) == (method == "lookm" and options["heads"] == "each")
    for g, head in enumerate(heads):
        pick = (lambda x: x[g]) if trace.heads is not None else (lambda x: x)
        for l, layer in enumerate(head.layers):  # the prefill plan does not depend on hold_budget
            np.testing.assert_allclose(layer.scores, pick(ref["scores"][0][l]), rtol=1e-4, atol=1e-5)
            assert layer.group.tolist() == pick(ref["group"][0][l])
    if method == "vlcache" and not options["hold_budget"]:
        # VL-Cache as published: the prompt is compressed once, then every token is kept.
        assert lengths.tolist() == [[k + s for k in ref["counts"]] for s in range(NEW)]
        assert len(trace.evictions) == 0
        return
    assert tokens == ref_tokens[0]
    np.testing.assert_array_equal(lengths, np.array(ref["lengths"]))  # every layer, every forward
    if method != "lookm":  # each layer holds its own ratio k_l / T
        for s in range(NEW):
            assert lengths[s].tolist() == [exact_layer_keep(k, T, T + s, minimum) for k in ref["counts"]]
    for g, head in enumerate(heads):
        expected = sorted((r[0], r[2], r[4]) for r in ref["evictions"] if r[3] == g or trace.heads is None)
        assert [tuple(r) for r in head.evictions.tolist()] == expected


# ---------------------------------------------------------------- the pieces the policies share

def test_decode_view_finds_the_entry_of_each_rank_in_either_slot_order():
    """``slot_of_rank(r)``: the slot holding each row's r-th smallest position, whether the
    slots are permuted (preallocated layout) or in position order (dynamic layout)."""
    g = torch.Generator().manual_seed(0)
    permuted = torch.stack([torch.randperm(9, generator=g) * 3 for _ in range(4)])  # 4 rows, 9 slots
    ordered = permuted.sort(dim=1).values
    view = dict(layer_idx=0, accumulated=None, seen=30, prompt_length=20, prompt_entries=8, max_entries=8)
    for rank in range(9):
        slots = Decode(positions=permuted, ordered=False, **view).slot_of_rank(rank)
        assert [int(permuted[r, s]) for r, s in enumerate(slots)] == [sorted(row.tolist())[rank] for row in permuted]
        assert Decode(positions=ordered, ordered=True, **view).slot_of_rank(rank).tolist() == [rank] * 4


def test_recent_share_is_the_exact_floor():
    """A recent window of ``ratio`` of ``n`` entries: floor(ratio x n) in exact fractions (the
    float product of 0.7 x 90 is 62.99...), never all of them."""
    for ratio in (0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 0.99, 1.0):
        for n in range(1, 400):
            assert share_count(n, ratio) == min(n - 1, math.floor(Fraction(str(ratio)) * n)), (ratio, n)
