"""The cache policies against independent references: a stock DynamicCache run, a naive
loop implementation on eager attention maps, and budget arithmetic in exact fractions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import elastic
from naive import exact_keep, run
from tiny import qwen2vl_inputs, tiny_llama, tiny_llava, tiny_qwen2vl

METHODS = list(elastic.METHODS)


@pytest.fixture(scope="module")
def llama():
    return elastic.attach(tiny_llama(layers=3, heads=4, kv_heads=2, sharpness=30.0))


def prompt(T=48, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 64, (batch, T), generator=g)


def generate(model, ids, cache, n=12):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=n,
                              min_new_tokens=n, do_sample=False)


# -- budget 1.0 is the full cache -----------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_budget_one_matches_dynamic_cache_llama(method):
    model = tiny_llama(layers=2)
    ids = prompt(40)
    reference = generate(model, ids, DynamicCache())
    elastic.attach(model)
    assert torch.equal(generate(model, ids, elastic.make_cache(method, budget=1.0)), reference)


@pytest.mark.parametrize("method", METHODS)
def test_budget_one_matches_dynamic_cache_llava(method):
    model, processor = tiny_llava()
    from PIL import Image
    inputs = processor(text=[processor.apply_chat_template(
        [elastic.user_message("what is the colour ?", True)], add_generation_prompt=True, tokenize=False)],
        images=[Image.new("RGB", (40, 30), "blue")], return_tensors="pt")
    with torch.no_grad():
        reference = model.generate(**inputs, cache=DynamicCache(), max_new_tokens=10, do_sample=False)
        elastic.attach(model)
        out = model.generate(**inputs, cache=elastic.make_cache(method, budget=1.0), max_new_tokens=10, do_sample=False)
    assert torch.equal(out, reference)


@pytest.mark.parametrize("method", METHODS)
def test_budget_one_matches_dynamic_cache_qwen2vl(method):
    model = tiny_qwen2vl()
    inputs = qwen2vl_inputs()
    with torch.no_grad():
        reference = model.generate(**inputs, cache=DynamicCache(), max_new_tokens=10, do_sample=False)
        elastic.attach(model)
        out = model.generate(**inputs, cache=elastic.make_cache(method, budget=1.0), max_new_tokens=10, do_sample=False)
    assert torch.equal(out, reference)


def test_attach_leaves_the_vision_tower_alone():
    model, _ = tiny_llava()
    elastic.attach(model)
    elastic.attach(model)  # idempotent
    assert model.config.text_config._attn_implementation == "elastic_sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"


# -- every policy against the naive loop implementation -------------------------------

@pytest.mark.parametrize("method,budget,start_size", [
    ("elastic", 0.3, 1), ("elastic", 0.5, 2), ("h2o", 0.3, 1), ("h2o", 0.5, 1), ("local", 0.3, 2),
])
def test_policy_matches_naive_reference(llama, method, budget, start_size):
    T, n = 48, 14
    ids = prompt(T, seed=3)
    cache = elastic.make_cache(method, budget=budget, start_size=start_size, distance=-6)
    out = generate(llama, ids, cache, n)
    tokens, ref = run(llama, ids, method, budget, n, start_size=start_size, distance=-6)
    trace = cache.trace
    assert out[0, T:].tolist() == tokens
    for l, layer in enumerate(trace.layers):
        if method != "local":
            np.testing.assert_allclose(layer.scores, ref["scores"][l], rtol=1e-4, atol=1e-5)
        assert layer.kept.tolist() == ref["kept"][l]
        assert layer.group.tolist() == ref["group"][l]
    assert [tuple(r) for r in trace.evictions.tolist()] == sorted(ref["evictions"])
    assert trace.lengths == ref["lengths"]
    for l, layer in enumerate(cache.layers):  # the K/V left at the end are the same entries
        order = layer.positions[0].argsort()  # a preallocated layer's slots are in any order
        assert layer.positions[0, order].tolist() == trace.positions_at(l, trace.decode_steps).tolist()
        torch.testing.assert_close(layer.keys[:, :, order], ref["keys"][l], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.values[:, :, order], ref["values"][l], rtol=1e-4, atol=1e-5)


def test_elastic_prefill_merges_group_means(llama):
    """Right after the prefill each kept entry is the plain mean of its group's K and V."""
    T = 50
    ids = prompt(T, seed=5)
    full = DynamicCache()
    with torch.no_grad():
        llama(input_ids=ids, cache=full)
    cache = elastic.make_cache("elastic", budget=0.25, start_size=1)
    generate(llama, ids, cache, n=1)  # one new token: the prefill only
    trace = cache.trace
    for l, layer in enumerate(trace.layers):
        assert len(layer.kept) == math.ceil(0.25 * T)
        for slot, anchor in enumerate(layer.kept):
            members = np.flatnonzero(layer.group == anchor)
            assert anchor in members
            expected_k = full.layers[l].keys[:, :, members].mean(dim=2)
            expected_v = full.layers[l].values[:, :, members].mean(dim=2)
            torch.testing.assert_close(cache.layers[l].keys[:, :, slot], expected_k, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(cache.layers[l].values[:, :, slot], expected_v, rtol=1e-4, atol=1e-5)
        # every prompt position is held by exactly one kept entry
        assert set(layer.group.tolist()) == set(layer.kept.tolist())


def test_elastic_protects_sinks_and_last_token(llama):
    T, start = 40, 3
    cache = elastic.make_cache("elastic", budget=0.2, start_size=start, distance=-5)
    generate(llama, prompt(T, seed=7), cache, n=30)
    trace = cache.trace
    protected = list(range(start)) + [T - 1]
    assert trace.protected.tolist() == protected
    for l, layer in enumerate(trace.layers):
        for p in protected:
            assert layer.group[p] == p
            assert (layer.group == p).sum() == 1  # absorbs nothing
        for step in range(trace.decode_steps + 1):
            held = trace.positions_at(l, step)
            assert set(range(start)) <= set(held.tolist())
            assert len(held) == trace.lengths[step]
    assert not np.isin(trace.evictions[:, 2], np.arange(start)).any()


# -- the budget rule --------------------------------------------------------------------

@pytest.mark.parametrize("method", ["elastic", "h2o", "local", "full"])
@pytest.mark.parametrize("budget", [0.2, 0.3, 0.7])
def test_lengths_follow_budget_every_step(llama, method, budget):
    T, n = 37, 25
    cache = elastic.make_cache(method, budget=budget, start_size=1)
    generate(llama, prompt(T, seed=1), cache, n)
    minimum = {"elastic": 3, "local": 2, "h2o": 1, "full": 1}[method]
    rate = 1.0 if method == "full" else budget
    expected = [exact_keep(rate, T + s, minimum) for s in range(n)]  # n-1 decode forwards
    assert cache.lengths == expected
    for layer in cache.layers:  # physically shrunk, all layers alike
        assert layer.keys.shape[2] == layer.values.shape[2] == expected[-1]
    per_entry = 2 * 3 * 2 * 16 * 4  # K+V, layers, kv heads, head dim, float32
    assert cache.kv_bytes() == expected[-1] * per_entry


def test_local_keeps_sinks_and_recent_window(llama):
    T, n, budget, start = 40, 20, 0.3, 2
    cache = elastic.make_cache("local", budget=budget, start_size=start)
    generate(llama, prompt(T, seed=2), cache, n)
    trace = cache.trace
    for step in range(trace.decode_steps + 1):
        seen = T + step
        cap = exact_keep(budget, seen, start + 1)
        expected = list(range(start)) + list(range(seen - (cap - start), seen))
        for l in range(trace.num_layers):
            assert trace.positions_at(l, step).tolist() == expected


def test_decode_positions_are_true_positions():
    """Rotary embeddings see the same position ids as with a full cache."""
    def positions(model, cache, ids):
        seen = []
        hook = model.model.rotary_emb.register_forward_hook(lambda m, a, kw_out: None)
        hook.remove()
        handle = model.model.rotary_emb.register_forward_pre_hook(
            lambda m, args, kwargs: seen.append((args[1] if len(args) > 1 else kwargs["position_ids"]).tolist()),
            with_kwargs=True)
        generate(model, ids, cache, 10)
        handle.remove()
        return seen

    model = tiny_llama(layers=2)
    ids = prompt(30)
    reference = positions(model, DynamicCache(), ids)
    elastic.attach(model)
    assert positions(model, elastic.make_cache("elastic", budget=0.3), ids) == reference
    assert reference[-1] == [[30 + 8]]


def test_forward_without_position_ids_uses_true_positions(llama):
    """Direct forwards (no generate, no position ids) continue at the tokens seen, so a
    teacher-forced loop reproduces generate's greedy tokens."""
    T, n = 40, 10
    ids = prompt(T, seed=4)
    expected = generate(llama, ids, elastic.make_cache("elastic", budget=0.3), n)[0, T:].tolist()
    cache = elastic.make_cache("elastic", budget=0.3)
    with torch.no_grad():
        logits = llama(input_ids=ids, cache=cache).logits
        tokens = [int(logits[0, -1].argmax())]
        for _ in range(n - 1):
            logits = llama(input_ids=torch.tensor([[tokens[-1]]]), cache=cache).logits
            tokens.append(int(logits[0, -1].argmax()))
    assert tokens == expected
    assert cache.get_seq_length() == T + n - 1 > cache.layers[0].get_seq_length()


def test_qwen2vl_compressed_positions_match_full_cache():
    model = tiny_qwen2vl()
    inputs = qwen2vl_inputs()
    rotary = model.model.language_model.rotary_emb

    def positions(cache):
        seen = []
        handle = rotary.register_forward_pre_hook(
            lambda m, args, kwargs: seen.append((args[1] if len(args) > 1 else kwargs["position_ids"]).tolist()),
            with_kwargs=True)
        with torch.no_grad():
            model.generate(**inputs, cache=cache, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        handle.remove()
        return seen

    reference = positions(DynamicCache())
    elastic.attach(model)
    cache = elastic.make_cache("elastic", budget=0.3)
    assert positions(cache) == reference
    assert cache.lengths[0] == math.ceil(0.3 * inputs["input_ids"].shape[1])


# -- batches ----------------------------------------------------------------------------

def test_batch_has_per_sample_anchors():
    llama = elastic.attach(tiny_llama(layers=2, sharpness=30.0))
    ids = torch.cat([prompt(36, seed=11), prompt(36, seed=12)])
    batch_cache = elastic.make_cache("elastic", budget=0.3)
    out = generate(llama, ids, batch_cache, 8)
    kept_differ = False
    for b in range(2):
        single = elastic.make_cache("elastic", budget=0.3)
        single_out = generate(llama, ids[b : b + 1], single, 8)
        assert out[b].tolist() == single_out[0].tolist()
        for lb, ls in zip(batch_cache.traces[b].layers, single.trace.layers):
            assert lb.kept.tolist() == ls.kept.tolist()
            assert lb.group.tolist() == ls.group.tolist()
        kept_differ |= batch_cache.traces[0].layers[0].kept.tolist() != batch_cache.traces[1].layers[0].kept.tolist()
    assert kept_differ


def test_left_padded_batch_is_refused(llama):
    ids = torch.cat([prompt(30, seed=1), prompt(30, seed=2)])
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with pytest.raises(ValueError, match="padded batch"):
        llama.generate(ids, attention_mask=mask, cache=elastic.make_cache("elastic", budget=0.5), max_new_tokens=3)


# -- bad use ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(method="nope"), "unknown method"),
    (dict(method="elastic", budget=0), "budget"),
    (dict(method="elastic", budget=1.5), "budget"),
    (dict(method="elastic", budget=float("nan")), "budget"),
    (dict(method="elastic", budget="half"), "budget"),
    (dict(method="elastic", start_size=-1), "start_size"),
    (dict(method="elastic", distance=2.5), "distance"),
    (dict(method="h2o", recent_ratio=2.0), "recent_ratio"),
    (dict(method="elastic", budgett=0.5), "unknown parameter"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        elastic.make_cache(**kwargs)


def test_unattached_model_is_reported():
    model = tiny_llama(layers=2)
    with pytest.raises(RuntimeError, match="elastic.attach"):
        generate(model, prompt(20), elastic.make_cache("elastic", budget=0.5), 3)


def test_second_generate_continues_or_raises(llama):
    """Continuing the same sequence works (same tokens as one long call); appending a new
    multi-token turn to a compressed cache raises."""
    ids = prompt(30)
    one_go = generate(llama, ids, elastic.make_cache("elastic", budget=0.5), 9)
    cache = elastic.make_cache("elastic", budget=0.5)
    first = generate(llama, ids, cache, 4)
    assert torch.equal(generate(llama, first, cache, 5), one_go)
    with pytest.raises(ValueError, match="new cache"):
        generate(llama, torch.cat([one_go, prompt(5, seed=9)], dim=1), cache, 2)


def test_attention_received_chunks_agree_with_naive():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 13, 8)
    got = elastic.attention_received(q, k, scaling=0.3, chunk=4)
    # naive: GQA heads share keys; query i sits at key index 13 - 9 + i
    expected = torch.zeros(2, 13)
    for b in range(2):
        for h in range(4):
            for i in range(9):
                logits = torch.tensor([float(q[b, h, i] @ k[b, h // 2, j]) * 0.3 if j <= 4 + i else -math.inf
                                       for j in range(13)])
                expected[b] += logits.softmax(0) / 4
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_head, softcap", [(False, None), (True, None), (False, 2.0)])
def test_attention_received_of_one_decode_query_agrees_with_naive(per_head, softcap):
    """A decode step's single query takes a shortcut past the chunked loop: against a naive loop."""
    torch.manual_seed(1)
    q, k = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 11, 8)
    got = elastic.attention_received(q, k, scaling=0.3, per_head=per_head, softcap=softcap)
    expected = torch.zeros(2, 2, 11) if per_head else torch.zeros(2, 11)
    for b in range(2):
        for h in range(4):
            logits = torch.tensor([float(q[b, h, 0] @ k[b, h // 2, j]) * 0.3 for j in range(11)])
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
            if per_head:
                expected[b, h // 2] += logits.softmax(0) / 2  # mean over the 2 query heads of a KV head
            else:
                expected[b] += logits.softmax(0) / 4
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_num_return_sequences_with_sampling_is_a_batch_of_equal_prompts(llama):
    ids = prompt(24, seed=8)
    torch.manual_seed(0)
    several = llama.generate(ids, cache=elastic.make_cache("elastic", budget=0.5), max_new_tokens=6, do_sample=True,
                             num_return_sequences=2)
    torch.manual_seed(0)
    batch = llama.generate(ids.repeat(2, 1), cache=elastic.make_cache("elastic", budget=0.5), max_new_tokens=6,
                           do_sample=True)
    assert torch.equal(several, batch) and several.shape[0] == 2
    with pytest.raises(NotImplementedError, match="beam search"):
        llama.generate(ids, cache=elastic.make_cache("elastic", budget=0.5), max_new_tokens=3, num_beams=2)
