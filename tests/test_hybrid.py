"""Decoders that mix layer types (issue 33): the cache builds one layer per entry of the
text decoder's layer types, compresses the full-attention layers and leaves the others to
transformers. Tiny random models, offline: Gemma 3 (sliding + full, a window shorter than
the prompt, image tokens), Qwen3.5 (linear attention + full: the text model, and the VLM
with an image), LFM2-VL (conv + full),
Llama 4's text decoder (chunked + full), Gemma 2 (logit soft-capping), Mistral 3 with a
model-wide sliding window (nothing to compress: every method runs on transformers' windows)."""

from __future__ import annotations

import functools
import threading

import numpy as np
import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer, LinearAttentionLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

import elastic
from naive import exact_keep, exact_layer_keep, exact_total

MINIMUM = {"elastic": 3, "local": 2, "h2o": 1, "snapkv": 1, "tova": 1, "h2o-ref": 2, "full": 1,
           "prefixkv": 3, "vlcache": 1, "lookm": 1}  # protected + 1 (start_size=1), as tests/test_layout.py
T, NEW, BUDGET, WINDOW = 24, 6, 0.5, 6
TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=256)


def _build(name):
    torch.manual_seed(0)
    if name == "gemma3":
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration

        text = dict(TEXT, sliding_window=WINDOW,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=16, patch_size=4)
        config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=100,
                              boi_token_index=101, eoi_token_index=102)
        return Gemma3ForConditionalGeneration(config)
    if name == "gemma2":
        from transformers import Gemma2Config, Gemma2ForCausalLM

        return Gemma2ForCausalLM(Gemma2Config(**dict(TEXT, sliding_window=WINDOW, attn_logit_softcapping=0.5)))
    if name == "qwen3_5":
        from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

        return Qwen3_5ForCausalLM(Qwen3_5TextConfig(
            **TEXT, linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
            layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"]))
    if name == "qwen3_5_vl":
        from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

        text = dict(TEXT, vocab_size=160, linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8,
                    linear_value_head_dim=8,
                    layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
                    rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 0],
                                         partial_rotary_factor=0.5, mrope_interleaved=True))
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16)
        return Qwen3_5ForConditionalGeneration(Qwen3_5Config(
            text_config=text, vision_config=vision, image_token_id=150, video_token_id=151,
            vision_start_token_id=152, vision_end_token_id=153))
    if name == "lfm2_vl":
        from transformers import Lfm2VlConfig, Lfm2VlForConditionalGeneration

        text = dict(model_type="lfm2", **{k: v for k, v in TEXT.items() if k != "head_dim"}, full_attn_idxs=[1, 3],
                    block_ff_dim=64, block_auto_adjust_ff_dim=False)
        vision = dict(model_type="siglip2_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_patches=16, patch_size=4)
        return Lfm2VlForConditionalGeneration(Lfm2VlConfig(text_config=text, vision_config=vision, image_token_id=120,
                                                           projector_hidden_size=32))
    if name == "llama4":  # the text decoder: transformers' Llama4ForConditionalGeneration cannot run (see below)
        from transformers import Llama4ForCausalLM, Llama4TextConfig

        return Llama4ForCausalLM(Llama4TextConfig(**TEXT, intermediate_size_mlp=64, attention_chunk_size=WINDOW,
                                                  num_local_experts=2, no_rope_layers=[1, 0, 1, 0]))
    if name == "mistral3":
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration

        text = dict(model_type="mistral", **TEXT, sliding_window=WINDOW)
        vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, image_size=16, patch_size=4, head_dim=16)
        return Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision,
                                                               image_token_index=120, spatial_merge_size=2))
    raise KeyError(name)


@functools.cache
def model(name, attn="sdpa"):
    m = _build(name).eval()
    if attn != "sdpa":
        m.set_attn_implementation(attn)
    return elastic.attach(m)


FULL_LAYERS = {"gemma3": [1, 3], "qwen3_5": [1, 3], "qwen3_5_vl": [1, 3], "lfm2_vl": [1, 3], "llama4": [1, 3]}
OTHER = {"gemma3": DynamicSlidingWindowLayer, "qwen3_5": LinearAttentionLayer, "qwen3_5_vl": LinearAttentionLayer,
         "lfm2_vl": LinearAttentionLayer, "llama4": DynamicSlidingWindowLayer}


def inputs(name, batch=1):
    """``T`` prompt tokens; Gemma 3's carry a 16x16 image as 4 image tokens (bidirectional),
    Qwen3.5's VLM a 16x16 image as 4 merged patches."""
    torch.manual_seed(1)
    ids = torch.randint(5, 99, (batch, T))
    extra = {}
    if name == "gemma3":
        ids[:, 6:12] = torch.tensor([101, 100, 100, 100, 100, 102])
        extra = dict(pixel_values=torch.randn(batch, 3, 16, 16), token_type_ids=(ids == 100).long())
    if name == "qwen3_5_vl":
        ids[:, 5:11] = torch.tensor([152, 150, 150, 150, 150, 153])
        extra = dict(pixel_values=torch.randn(batch * 16, 3 * 2 * 4 * 4), image_grid_thw=torch.tensor([[1, 4, 4]] * batch),
                     mm_token_type_ids=(ids == 150).int())
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), **extra)


def generate(m, x, cache=None):
    kwargs = {} if cache is None else dict(cache=cache)
    with torch.no_grad():
        return m.generate(**x, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, **kwargs)


@pytest.mark.parametrize("name", list(FULL_LAYERS))
def test_full_cache_reproduces_generate(name):
    m, x = model(name), inputs(name)
    cache = elastic.make_cache("full")
    assert torch.equal(generate(m, x, cache), generate(m, x))
    kinds = m.config.get_text_config(decoder=True).layer_types
    assert cache.layer_types == list(kinds)
    for i, layer in enumerate(cache.layers):
        assert isinstance(layer, elastic.PolicyLayer if i in FULL_LAYERS[name] else OTHER[name])


@pytest.mark.parametrize("name", list(FULL_LAYERS))
def test_every_method_keeps_the_budget_on_full_attention_layers(name):
    m, x = model(name), inputs(name)
    full = FULL_LAYERS[name]
    reference = DynamicCache(config=m.config)  # transformers' own cache, for the other layers
    with torch.no_grad():
        m(**x, cache=reference, use_cache=True)
    for method in elastic.METHODS:
        cache = elastic.make_cache(method, budget=BUDGET)
        generate(m, x, cache)
        rate = 1.0 if method == "full" else BUDGET
        lengths = cache.layer_lengths  # [forwards, full layers]
        assert lengths.shape == (NEW, len(full)), method
        if cache.policy.budgets_per_layer:
            kept = lengths[0].tolist()
            assert sum(kept) == exact_total(BUDGET, len(full), T, MINIMUM[method]), method
            expected = [[exact_layer_keep(k, T, T + s, MINIMUM[method]) for k in kept] for s in range(NEW)]
        else:
            expected = [exact_keep(rate, T + s, MINIMUM[method]) for s in range(NEW)]
            if method == "h2o-ref" and T - expected[0] > 1:  # its rank-position selection keeps one entry less
                expected[0] -= 1  # (as tests/test_layout.py)
                expected = [min(e, expected[0] + s) for s, e in enumerate(expected)]
            expected = [[e] * len(full) for e in expected]
        np.testing.assert_array_equal(lengths, expected, err_msg=method)
        # The other layers behave as transformers' own: a window of W - 1 entries, or a fixed state.
        for i, (layer, ref) in enumerate(zip(cache.layers, reference.layers)):
            if i in full:
                continue
            assert type(layer) is type(ref), method
            if isinstance(layer, DynamicSlidingWindowLayer):
                assert layer.keys.shape[-2] == min(T + NEW - 1, WINDOW - 1) and layer.cumulative_length == T + NEW - 1
            else:
                assert {k: v.shape for k, v in layer.conv_states.items() if v is not None} == \
                       {k: v.shape for k, v in ref.conv_states.items() if v is not None}
        trace = cache.trace
        assert trace.layer_ids == full and len(trace.layers) == len(full)
        assert trace.evictions.shape[0] == 0 or trace.evictions[:, 1].max() < len(full)


@pytest.mark.parametrize("name", list(FULL_LAYERS))
def test_kv_bytes_count_the_full_layers_and_state_bytes_the_others(name):
    m, x = model(name), inputs(name)
    cache = elastic.make_cache("elastic", budget=BUDGET, layout="dynamic")
    generate(m, x, cache)
    entry = 2 * 2 * 8 * 4  # K and V, 2 KV heads, head_dim 8, float32
    held = exact_keep(BUDGET, T + NEW - 1, MINIMUM["elastic"])
    assert cache.kv_bytes() == len(FULL_LAYERS[name]) * held * entry
    # The others hold what transformers' cache holds for the same number of tokens.
    reference = DynamicCache(config=m.config)
    with torch.no_grad():
        m(**x, cache=reference, use_cache=True)
        m(input_ids=x["input_ids"][:, :NEW - 1], cache=reference, use_cache=True)
    expected = 0
    for i, ref in enumerate(reference.layers):
        if i in FULL_LAYERS[name]:
            continue
        if isinstance(ref, LinearAttentionLayer):
            expected += sum(s.numel() * s.element_size() for s in [*ref.conv_states.values(), *ref.recurrent_states.values()]
                            if s is not None)
        else:
            expected += 2 * ref.keys.numel() * ref.keys.element_size()
    assert cache.state_bytes() == expected > 0


def _eager_scores(name, method="h2o"):
    """(trace scores of the full-attention layers, eager attention column sums of the same layers)."""
    m, x = model(name, "eager"), inputs(name)
    cache = elastic.make_cache(method, budget=BUDGET)
    with torch.no_grad():
        out = m(**x, cache=cache, use_cache=True, output_attentions=True)
    trace = cache.trace
    reference = [out.attentions[i][0].sum(dim=-2).mean(dim=0).numpy() for i in trace.layer_ids]
    return [layer.scores for layer in trace.layers], reference, x


def test_scores_follow_gemma3_bidirectional_image_attention():
    """Gemma 3 lets image tokens attend to each other both ways during the prefill: the
    scores are the column sums of the model's own eager attention, not of a causal one."""
    scores, reference, x = _eager_scores("gemma3")
    for ours, ref in zip(scores, reference, strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
    # Under sdpa (the default: a boolean mask) the scores are the same.
    cache = elastic.make_cache("h2o", budget=BUDGET)
    with torch.no_grad():
        model("gemma3")(**x, cache=cache, use_cache=True)
    for ours, ref in zip(cache.trace.layers, reference, strict=True):
        np.testing.assert_allclose(ours.scores, ref, rtol=1e-4, atol=1e-5)
    # The control: without token_type_ids the model attends causally, and the image
    # tokens' column sums change (so the match above needed the model's own mask).
    m = model("gemma3", "eager")
    with torch.no_grad():
        causal = m(**{k: v for k, v in x.items() if k != "token_type_ids"}, output_attentions=True).attentions
    image = (x["input_ids"][0] == 100).nonzero().flatten()
    for ref, i in zip(reference, FULL_LAYERS["gemma3"]):
        assert not np.allclose(ref[image], causal[i][0].sum(dim=-2).mean(dim=0).numpy()[image], atol=1e-3)


def test_scores_follow_gemma2_logit_softcapping():
    scores, reference, _ = _eager_scores("gemma2")
    for ours, ref in zip(scores, reference, strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


def test_attention_received_follows_a_sliding_window_mask():
    """A sliding layer's own mask and queries, captured from Gemma 3's eager attention:
    ``attention_received`` with that mask equals the layer's eager column sums."""
    m = _build("gemma3").eval()
    seen = {}
    eager = ALL_MASK_ATTENTION_FUNCTIONS["eager"]

    def capture(module, query, key, value, attention_mask, **kwargs):
        seen.setdefault(module.layer_idx, (query, key, attention_mask, kwargs))
        return __import__(type(module).__module__, fromlist=["x"]).eager_attention_forward(
            module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("h1_capture", capture)
    AttentionMaskInterface.register("h1_capture", eager)
    m.set_attn_implementation({"text_config": "h1_capture"})
    with torch.no_grad():
        out = m(**inputs("gemma3"), output_attentions=True)
    query, key, mask, kwargs = seen[0]  # layer 0: sliding, window 6 < 24 tokens
    ours = elastic.attention_received(query, key, kwargs.get("scaling"), mask=mask, chunk=5)
    np.testing.assert_allclose(ours[0].numpy(), out.attentions[0][0].sum(dim=-2).mean(dim=0).numpy(),
                               rtol=1e-4, atol=1e-5)
    causal = elastic.attention_received(query, key, kwargs.get("scaling"), chunk=5)
    assert not torch.allclose(causal, ours, atol=1e-3)  # the window mattered


def test_sliding_window_is_not_mistaken_for_padding_and_padding_still_refused():
    m = model("gemma3")
    x = inputs("gemma3", batch=2)
    generate(m, x, elastic.make_cache("elastic", budget=BUDGET))  # window 6 < 24 tokens: no padding error
    x["attention_mask"][1, :3] = 0
    with pytest.raises(ValueError, match="padded batch"):
        generate(m, x, elastic.make_cache("elastic", budget=BUDGET))


def test_mistral3_with_a_model_wide_sliding_window():
    """Every layer is a sliding one: every method runs on transformers' own windows and
    answers as plain generate; a compressing method warns that it compresses nothing; there
    is no per-layer trace, and elastic.generate (which returns one) refuses before any work."""
    m = model("mistral3")
    x = inputs("mistral3")
    plain = generate(m, x)
    for method in elastic.METHODS:
        cache = elastic.make_cache(method, budget=BUDGET)
        if method == "full":
            out = generate(m, x, cache)
        else:
            with pytest.warns(UserWarning, match=f"no full-attention layer.*{method!r} compresses nothing"):
                out = generate(m, x, cache)
        assert torch.equal(out, plain), method
        assert cache.kv_bytes() == 0 and cache.state_bytes() > 0
        assert all(isinstance(layer, DynamicSlidingWindowLayer) and layer.keys.shape[-2] == WINDOW - 1
                   for layer in cache.layers)
        with pytest.raises(ValueError, match="no full-attention layer.*no per-layer trace"):
            cache.trace
    with pytest.raises(ValueError, match="elastic.generate traces the full-attention layers.*sliding_window=None"):
        elastic.generate(m, None, None, "What is in the image?", method="elastic")


def test_llama4_conditional_generation_is_refused_with_a_way_out():
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    text = dict(TEXT, num_hidden_layers=2, intermediate_size_mlp=64, attention_chunk_size=WINDOW,
                num_local_experts=2, no_rope_layers=[1, 0])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=4, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)
    m = Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=vision,
                                                    image_token_index=120)).eval()
    with pytest.raises(AttributeError, match="image_outputs"):  # transformers' own bug (when fixed, drop the refusal)
        m(input_ids=torch.tensor([[5, 6, 7]]))
    with pytest.raises(ValueError, match="model.language_model"):
        elastic.attach(m)


def test_unknown_layer_types_are_refused_by_name():
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(**dict(TEXT, num_hidden_layers=2)))
    m.config.layer_types = ["full_attention", "indexed_attention"]
    with pytest.raises(ValueError, match="'indexed_attention'"):
        elastic.attach(m)


def test_explicit_config_binds_before_any_forward():
    m = model("qwen3_5")
    cache = elastic.make_cache("elastic", budget=BUDGET, config=m.config)
    assert [type(layer) for layer in cache.layers][:2] == [LinearAttentionLayer, elastic.PreallocatedLayer]
    x = inputs("qwen3_5")
    reference = elastic.make_cache("elastic", budget=BUDGET)
    assert torch.equal(generate(m, x, cache), generate(m, x, reference))


def test_concurrent_generations_do_not_mix():
    """Two threads generate on the same hybrid model with their own caches at once."""
    m, x = model("gemma3"), inputs("gemma3")
    expected = {method: generate(m, x, elastic.make_cache(method, budget=BUDGET)) for method in ("elastic", "h2o")}
    results, errors = {}, []

    def run(method):
        try:
            for _ in range(3):
                results.setdefault(method, []).append(generate(m, x, elastic.make_cache(method, budget=BUDGET)))
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(method,)) for method in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for method, outs in results.items():
        assert all(torch.equal(out, expected[method]) for out in outs)


@pytest.mark.parametrize("method", ["h2o-ref", "prefixkv"])  # one score for all layers; one budget per layer
def test_cross_layer_step_finishes_at_the_last_full_attention_layer(method):
    """The decoder ends with a linear-attention layer: the shared step must finish when the
    last *full-attention* layer (2) has attended, within the same forward."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    torch.manual_seed(0)
    m = elastic.attach(Qwen3_5ForCausalLM(Qwen3_5TextConfig(
        **TEXT, linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
        layer_types=["full_attention", "linear_attention", "full_attention", "linear_attention"])).eval())
    cache = elastic.make_cache(method, budget=BUDGET)
    ids = inputs("qwen3_5")["input_ids"]
    with torch.no_grad():
        m(input_ids=ids, cache=cache, use_cache=True)
    full = [cache.layers[0], cache.layers[2]]
    assert not cache.step.waiting
    assert all(layer.prompt_entries is not None and layer.get_seq_length() < T for layer in full)
    if method == "prefixkv":  # the total over the full-attention layers only
        assert sum(layer.get_seq_length() for layer in full) == exact_total(BUDGET, 2, T, MINIMUM[method])
    else:  # one shared score: both layers keep the same positions
        assert torch.equal(full[0].positions.sort().values, full[1].positions.sort().values)


def test_the_inner_model_called_on_its_own_binds_the_cache_too():
    """Gemma3Model called on its own (a manual loop) reaches the hooked text decoder, which
    binds the cache: the same layers and decisions as an explicitly bound cache."""
    m, x = model("gemma3"), inputs("gemma3")
    caches = [elastic.make_cache("elastic", budget=BUDGET), elastic.make_cache("elastic", budget=BUDGET, config=m.config)]
    with torch.no_grad():
        for cache in caches:
            m.model(**x, cache=cache, use_cache=True)
    assert [type(layer) for layer in caches[0].layers] == [type(layer) for layer in caches[1].layers]
    assert caches[0].trace.layer_ids == caches[1].trace.layer_ids == FULL_LAYERS["gemma3"]
    for a, b in zip(caches[0].trace.layers, caches[1].trace.layers, strict=True):
        np.testing.assert_array_equal(a.group, b.group)
