"""Elastic's ablation options and the peer policies (SnapKV, TOVA) against the naive loop
implementation on eager attention maps: kept sets, groups, merged K/V, scores, decode
victims and the budget rule at every step, per KV head where the policy selects per head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import elastic
from naive import exact_keep, protected_of, run
from test_cache import generate, llama, prompt  # noqa: F401 (llama is a fixture)

SPANS = {"system": (0, 6), "instruction": (30, 48)}
CASES = [
    ("elastic", dict(importance="mean")),
    ("elastic", dict(importance="moving-average", ema_decay=0.8)),
    ("elastic", dict(importance="debiased")),
    ("elastic", dict(importance="uniform")),
    ("elastic", dict(scope="shared")),
    ("elastic", dict(scope="head")),
    ("elastic", dict(prefill="evict")),
    ("elastic", dict(prefill="kmeans")),
    ("elastic", dict(prefill="similar")),
    ("elastic", dict(decode="recent")),
    ("elastic", dict(decode="lowest-frequency")),
    ("elastic", dict(protect="last", protect_last=6)),
    ("elastic", dict(protect="instruction")),
    ("elastic", dict(scope="head", prefill="kmeans", decode="lowest-frequency", importance="debiased")),
    ("snapkv", dict(window=8)),
    ("snapkv", dict(window=8, kernel=3, pooling="max", heads="mean")),
    ("tova", dict()),
    ("tova", dict(heads="each")),
    ("h2o-ref", dict()),
    ("elastic", dict(scope="shared", decode="lowest-frequency")),
]


def assert_same_decisions(cache, tokens, ref_tokens, ref, per_head):
    """Tokens, every layer's scores, groups and kept set, and every eviction, as the naive run."""
    assert tokens == ref_tokens
    trace = cache.trace
    heads = trace.heads or [trace]
    assert (trace.heads is not None) == per_head
    for g, head in enumerate(heads):
        pick = (lambda x: x[g]) if per_head else (lambda x: x)
        for l, layer in enumerate(head.layers):
            if pick(ref["scores"][l]) is None:
                assert layer.scores is None
            else:
                np.testing.assert_allclose(layer.scores, pick(ref["scores"][l]), rtol=1e-4, atol=1e-5)
            assert layer.group.tolist() == pick(ref["group"][l])
            assert layer.kept.tolist() == pick(ref["kept"][l])
        expected = sorted((r[0], r[1], r[3]) for r in ref["evictions"] if r[2] == g) if per_head \
            else sorted(ref["evictions"])
        assert [tuple(r) for r in head.evictions.tolist()] == expected


def case_id(case):
    method, options = case
    return method + "-" + "-".join(f"{k}={v}" for k, v in options.items())


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_option_matches_naive_reference(llama, case):
    method, options = case
    T, n, budget = 48, 14, 0.4
    ids = prompt(T, seed=3)
    cache = elastic.make_cache(method, budget=budget, distance=-6, **options)
    cache.annotate(spans=SPANS)
    out = generate(llama, ids, cache, n)
    tokens, ref = run(llama, ids, method, budget, n, distance=-6, spans=SPANS, **options)
    per_head = options.get("scope") == "head" or options.get("heads", "each" if method == "snapkv" else "") == "each"
    assert_same_decisions(cache, out[0, T:].tolist(), tokens, ref, per_head)
    trace = cache.trace
    assert trace.options == cache.policy.options() and trace.options[next(iter(options), "budget")] is not None
    assert len(trace.evictions) > 0  # the decode rule was exercised
    minimum = len(protected_of(method, T, 1, options.get("protect", "none"), options.get("protect_last", 8),
                               SPANS)) + 1
    expected = [exact_keep(budget, T + s, minimum) for s in range(n)]
    if method == "h2o-ref":  # its rank-position selection keeps one entry under the budget
        expected = [min(e, expected[0] - 1 + s) for s, e in enumerate(expected)]
    assert trace.lengths == ref["lengths"] == expected
    for l, layer in enumerate(cache.layers):  # the K/V left at the end, row by row
        keys, values = layer._rows(layer.keys), layer._rows(layer.values)
        ref_k = ref["keys"][l][0].unflatten(0, (layer.groups, -1))
        ref_v = ref["values"][l][0].unflatten(0, (layer.groups, -1))
        for r in range(keys.shape[0]):
            order = layer.positions[r].argsort()
            torch.testing.assert_close(keys[r][:, order], ref_k[r], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(values[r][:, order], ref_v[r], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method,options", [
    ("local", {}), ("elastic", {}), ("elastic", dict(decode="lowest-frequency")), ("h2o-ref", {}),
])
def test_more_sinks_than_prompt_tokens(llama, method, options):
    """``start_size`` longer than the prompt: the whole prompt is sinks, generated tokens are
    not, and decoding evicts among them as the naive reference does (no IndexError)."""
    T, n, start = 10, 12, 16
    ids = prompt(T, seed=6)
    cache = elastic.make_cache(method, budget=0.5, start_size=start, distance=-6, **options)
    out = generate(llama, ids, cache, n)
    tokens, ref = run(llama, ids, method, 0.5, n, start_size=start, distance=-6, **options)
    assert out[0, T:].tolist() == tokens
    assert [tuple(r) for r in cache.trace.evictions.tolist()] == sorted(ref["evictions"])
    assert len(ref["evictions"]) > 0 and all(p >= T for _, _, p in ref["evictions"])


def test_default_elastic_is_the_paper(llama):
    """Every option at its default is exactly the method without options."""
    ids = prompt(48, seed=4)
    plain, explicit = elastic.make_cache("elastic", budget=0.3), elastic.make_cache(
        "elastic", budget=0.3, importance="sum", scope="layer", prefill="merge", decode="fixed-point", protect="none")
    assert torch.equal(generate(llama, ids, plain, 10), generate(llama, ids, explicit, 10))
    for a, b in zip(plain.trace.layers, explicit.trace.layers):
        np.testing.assert_array_equal(a.group, b.group)


@pytest.mark.parametrize("method,params,match", [
    ("elastic", dict(importance="max"), "importance must be one of"),
    ("elastic", dict(scope="model"), "scope must be one of"),
    ("elastic", dict(prefill="drop"), "prefill must be one of"),
    ("elastic", dict(decode="oldest"), "decode must be one of"),
    ("elastic", dict(protect="system"), "protect must be one of"),
    ("elastic", dict(protect_last=-1), "protect_last must be an integer >= 0"),
    ("elastic", dict(ema_decay=1.0), "ema_decay must be in"),
    ("snapkv", dict(window=0), "window must be an integer >= 1"),
    ("snapkv", dict(kernel=4), "kernel must be odd"),
    ("snapkv", dict(pooling="median"), "pooling must be one of"),
    ("tova", dict(heads="some"), "heads must be one of"),
])
def test_unknown_option_values_raise(method, params, match):
    with pytest.raises(ValueError, match=match):
        elastic.make_cache(method, **params)


def test_protect_instruction_finds_spans_or_is_explained(llama):
    # Through plain model.generate the attached model hands the cache its prompt's spans ...
    cache = elastic.make_cache("elastic", budget=0.5, protect="instruction")
    generate(llama, prompt(30), cache, 2)
    assert cache.trace.spans == {"instruction": (0, 30)}  # a text-only prompt is all instruction
    assert cache.trace.protected.tolist() == list(range(30))
    # ... and without spans the policy says how to pass them.
    with pytest.raises(ValueError, match=r"needs the prompt's token spans.*elastic.prompt_spans"):
        cache.policy.protected(30, None)


def test_shared_scope_keeps_the_same_positions_in_every_layer(llama):
    cache = elastic.make_cache("elastic", budget=0.3, scope="shared")
    generate(llama, prompt(48, seed=6), cache, 1)  # no decode step: the trace plans the prefill
    kept = [layer.kept.tolist() for layer in cache.trace.layers]
    assert all(k == kept[0] for k in kept) and len(kept[0]) == exact_keep(0.3, 48, 3)


@pytest.mark.parametrize("method", ["elastic", "h2o-ref"])
def test_compressed_positions_protocol_matches_naive(llama, method):
    """positions="compressed" feeds each decoded token at the cache's length (the reference
    code's protocol); the answer differs from the true-position run."""
    from elastic.generation import _compressed_positions

    T, n = 48, 12
    ids = prompt(T, seed=3)
    cache = elastic.make_cache(method, budget=0.4, distance=-6, positions="compressed")
    hook = _compressed_positions(llama, cache)
    try:
        out = generate(llama, ids, cache, n)
    finally:
        hook.remove()
    tokens, _ = run(llama, ids, method, 0.4, n, distance=-6, positions="compressed")
    assert out[0, T:].tolist() == tokens
    true_tokens, _ = run(llama, ids, method, 0.4, n, distance=-6)
    assert tokens != true_tokens
    with pytest.raises(ValueError, match="unknown positions"):
        elastic.make_cache(method, positions="restart")
