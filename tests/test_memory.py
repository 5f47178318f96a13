"""The full-size memory calculator (elastic.memory) against a hand computation, the
processors' own token counts, and a real cache after a real generate."""

import json
import math

import pytest
import torch

import elastic
from elastic import memory
from elastic.generation import prompt_annotations

# LLaVA-1.5-7B by hand: K and V, 32 layers, 32 KV heads, head_dim 128, bfloat16 (2 bytes).
LLAVA_ENTRY = 2 * 32 * 32 * 128 * 2  # bytes of one token in every layer: 524,288
GIB = 2**30


@pytest.fixture(scope="module")
def llava_table():
    return memory.rows("llava-1.5-7b", tokens=[1024, 4096], batches=[1, 8], methods=list(elastic.METHODS),
                       budgets=[0.2, 0.5], new=512)


def pick(table, tokens, batch, method, budget=None):
    (row,) = [r for r in table if (r.tokens, r.batch, r.method) == (tokens, batch, method)
              and (budget is None or r.budget == budget)]
    return row


def test_meta_builds_have_the_published_shapes():
    llava, qwen = memory.model_shape("llava-1.5-7b"), memory.model_shape("qwen2-vl-2b")
    assert (llava.layers, llava.heads, llava.kv_heads, llava.head_dim, llava.hidden) == (32, 32, 32, 128, 4096)
    assert (qwen.layers, qwen.heads, qwen.kv_heads, qwen.head_dim, qwen.hidden) == (28, 12, 2, 128, 1536)
    assert round(llava.parameters / 1e9, 2) == 7.06 and round(qwen.parameters / 1e9, 2) == 2.21
    assert (llava.context, qwen.context) == (4096, 32768)
    model = memory.build_meta("qwen2-vl-2b")
    assert {p.device.type for p in model.parameters()} == {"meta"}  # no memory, no weights


def test_hand_computation_llava_1k(llava_table):
    T = 1024
    full1, full8 = pick(llava_table, T, 1, "full"), pick(llava_table, T, 8, "full")
    assert full1.spans == {"system": (0, 5), "image": (5, 581), "instruction": (581, 1024)}
    # Full cache: every token; after the prefill 2*32*32*128*1024*2 bytes.
    assert full1.prefill_bytes == 536_870_912 == 2 * 32 * 32 * 128 * 1024 * 2
    assert full1.prefill_entries == 32 * 1024
    assert full1.end_entries == 32 * (1024 + 511)  # the 512th token is generated, never fed
    assert full1.slots == 32 * (1024 + 512 + 1)  # capacity(T + reserve) + 1
    assert full1.kv_bytes == 1535 * LLAVA_ENTRY and full1.allocated_bytes == 1537 * LLAVA_ENTRY
    assert (full8.prefill_bytes, full8.kv_bytes, full8.allocated_bytes) == (
        8 * full1.prefill_bytes, 8 * full1.kv_bytes, 8 * full1.allocated_bytes)
    # Elastic 0.2: ceil(0.2 * 1024) = 205 after the prefill, ceil(0.2 * 1535) = 307 at the end,
    # buffers of ceil(0.2 * 1536) + 1 = 309 slots.
    e1, e8 = pick(llava_table, T, 1, "elastic", 0.2), pick(llava_table, T, 8, "elastic", 0.2)
    assert (e1.prefill_entries, e1.end_entries, e1.slots) == (32 * 205, 32 * 307, 32 * 309)
    assert (e1.prefill_bytes, e1.kv_bytes, e1.allocated_bytes) == (205 * LLAVA_ENTRY, 307 * LLAVA_ENTRY,
                                                                   309 * LLAVA_ENTRY)
    assert e1.prefill_bytes == 107_479_040
    assert e8.allocated_bytes == 8 * 309 * LLAVA_ENTRY
    e5 = pick(llava_table, T, 1, "elastic", 0.5)
    assert (e5.prefill_entries, e5.end_entries, e5.slots) == (32 * 512, 32 * 768, 32 * 769)
    # PrefixKV at 0.2: one budget per layer; the total after the prefill is ceil(0.2 * 32 * 1024).
    p1 = pick(llava_table, T, 1, "prefixkv", 0.2)
    assert p1.per_layer_budget and p1.prefill_entries == 6554
    assert abs(p1.end_entries - math.ceil(0.2 * 32 * 1535)) < 32  # within one entry per layer


def test_hand_computation_llava_4k(llava_table):
    full, e = pick(llava_table, 4096, 8, "full"), pick(llava_table, 4096, 8, "elastic", 0.2)
    assert full.beyond_context and not pick(llava_table, 1024, 1, "full").beyond_context  # 4096 + 512 > 4096
    assert e.prefill_entries == 32 * 820  # ceil(819.2)
    assert e.slots == 32 * (922 + 1)  # ceil(0.2 * 4608) = 922
    assert full.allocated_bytes == 8 * (4096 + 513) * LLAVA_ENTRY


def test_every_method_is_covered(llava_table):
    assert {r.method for r in llava_table} == set(elastic.METHODS)
    per_layer = {r.method for r in llava_table if r.per_layer_budget}
    assert per_layer == {m for m, p in elastic.POLICIES.items() if p().budgets_per_layer} == {"prefixkv", "vlcache"}


def test_qwen2vl_gqa_bytes():
    (full,) = memory.rows("qwen2-vl-2b", tokens=[2048], batches=[1], methods=["full"], new=512)
    assert full.spans["image"] == (15, 15 + 256)  # 448 x 448: (448 / 14)^2 patches, 2 x 2 merged
    assert full.prefill_bytes == 2 * 28 * 2 * 128 * 2048 * 2  # only 2 KV heads


def test_image_tokens_are_the_processors():
    """The LLaVA processor expands <image> to 576 tokens; Qwen2-VL's image processor gives
    the grid that its processor expands (patches / merge^2)."""
    from PIL import Image
    from transformers import CLIPImageProcessorPil, LlavaProcessor, Qwen2VLImageProcessorPil

    from tiny import word_tokenizer

    directory = memory.config_dir("llava-1.5-7b")
    options = json.loads((directory / "processor_config.json").read_text())
    options.pop("processor_class")
    tokenizer = word_tokenizer()
    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(directory),
                               tokenizer=tokenizer, **options)
    out = processor(text="USER : <image> what is in the image ?", images=[Image.new("RGB", (640, 480))],
                    return_tensors="pt")
    n_image = int((out["input_ids"] == tokenizer.convert_tokens_to_ids("<image>")).sum())
    assert n_image == 576 == memory.image_tokens(memory.model_shape("llava-1.5-7b"))

    qwen = memory.model_shape("qwen2-vl-2b")
    images = Qwen2VLImageProcessorPil.from_pretrained(qwen.config_dir)
    for height, width in [(448, 448), (480, 640)]:
        grid = images(images=[Image.new("RGB", (width, height))], return_tensors="pt")["image_grid_thw"][0]
        assert int(grid.prod()) // 4 == memory.image_tokens(qwen, (height, width))


def _tiny_llava():
    from tiny import tiny_llava

    model, _ = tiny_llava(layers=4)
    with torch.no_grad():  # sharper attention, so PrefixKV's layers get different budgets
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    return elastic.attach(model)


def test_calculator_matches_a_real_cache():
    """What a real PolicyCache holds and allocates after a real generate is what the
    calculator says for the same shape, prompt and batch."""
    model = _tiny_llava()
    B, new, budget = 2, 9, 0.3
    image_id = model.config.image_token_id
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.tensor([2]), torch.randint(5, 20, (4,), generator=g), torch.full((16,), image_id),
                     torch.randint(5, 20, (19,), generator=g)])[None].repeat(B, 1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(1, 3, 32, 32, generator=g).repeat(B, 1, 1, 1)}
    T = ids.shape[1]
    spans = prompt_annotations(model, inputs)["spans"]
    shape = memory.shape_of(model, "tiny")
    assert (shape.layers, shape.kv_heads, shape.head_dim) == (4, 2, 16)
    methods = ["full", "elastic", "h2o", "snapkv", "prefixkv", "vlcache"]
    table = memory.rows(shape, [T], [B], methods, [budget], new, "float32",
                        system=spans["system"][1], image=spans["image"][1] - spans["image"][0])
    assert table[0].spans == spans
    # PrefixKV once more with calibrated per-layer shares: a split that is uneven by construction.
    runs = [(row, {}) for row in table] + [(table[methods.index("prefixkv")], dict(ratios=(1.0, 2.0, 3.0, 6.0)))]
    for row, params in runs:
        cache = elastic.make_cache(row.method, budget=row.budget, reserve=new, **params)
        cache.annotate(spans=spans)
        out = model.generate(**inputs, cache=cache, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=1)
        assert out.shape[1] == T + new
        lengths = cache.layer_lengths
        assert lengths[0].sum() == row.prefill_entries, row.method
        if not row.per_layer_budget:
            assert lengths[-1].sum() == row.end_entries, row.method
            assert cache.kv_bytes() == row.kv_bytes, row.method
            assert cache.allocated_bytes() == row.allocated_bytes, row.method
        else:  # the split follows the attention: the totals are within one entry per layer
            if params:
                assert len(set(lengths[0].tolist())) == 4  # the split really is uneven here
            entry = row.kv_bytes // (row.end_entries * B)
            slots = sum(layer.slots for layer in cache.layers)
            assert abs(lengths[-1].sum() - row.end_entries) < shape.layers, row.method
            assert abs(slots - row.slots) < shape.layers, row.method
            assert abs(cache.kv_bytes() - row.kv_bytes) < shape.layers * entry * B, row.method
            assert abs(cache.allocated_bytes() - row.allocated_bytes) < shape.layers * entry * B, row.method


def test_cli_prints_the_table(capsys):
    table = memory.main([])  # the defaults: LLaVA-1.5-7B, full and Elastic 0.2, 1k / 4k / 16k, batch 1 and 8
    text = capsys.readouterr().out
    assert {(r.method, r.budget) for r in table} == {("full", 1.0), ("elastic", 0.2)}
    assert len(table) == 3 * 2 * 2
    assert "| 1024 (5 + 576 + 443) | 1 | elastic | 0.2 | 205 | 307 | 309 | 0.100 | 0.150 | 0.151 | 0.201 |" in text
    assert f"| 16384 † | 8 | {8 * 16897 * LLAVA_ENTRY / GIB:.3f} | {8 * 3381 * LLAVA_ENTRY / GIB:.3f} |" in text
    assert "7.06B parameters" in text
    table = memory.main(["--methods", "all", "--tokens", "1024", "--batch", "1"])
    text = capsys.readouterr().out
    assert [r.method for r in table] == list(elastic.METHODS)
    assert "prefixkv ‡ | 0.2 | 6554 in all" in text and "layer_total" in text
    with pytest.raises(SystemExit):
        memory.main(["--methods", "nosuch"])
    with pytest.raises(SystemExit):
        memory.main(["--tokens", "100"])  # cannot hold 5 + 576 tokens


# -- Current flagships and hybrid decoders (issue 33) -----------------------------------------------
# Parameter counts the hub shows for each published checkpoint (safetensors metadata, rounded as the
# model card / hub page gives them); Qwen3.5-9B's card says 9B and its checkpoint adds a
# multi-token-prediction layer that transformers does not build, hence the looser bound.
PUBLISHED_SIZES = {"qwen2.5-vl-7b": (8.29e9, 0.02), "qwen3-vl-8b": (8.77e9, 0.02), "gemma-3-4b-it": (4.30e9, 0.02),
                   "gemma-3-12b-it": (12e9, 0.02), "gemma-3-27b-it": (27.4e9, 0.02), "lfm2.5-vl-1.6b": (1.6e9, 0.02),
                   "qwen3.5-9b": (9.0e9, 0.05)}


def _published(name: str) -> dict:
    return json.loads((memory.CONFIGS / name / "config.json").read_text())


@pytest.mark.parametrize("name", sorted(PUBLISHED_SIZES))
def test_flagship_configs_build_on_meta_with_published_sizes(name):
    published = _published(name)
    assert (memory.CONFIGS / name / "SOURCE.md").is_file()  # every configuration says where it comes from
    model = memory.build_meta(name)
    assert type(model).__name__ == published["architectures"][0]  # the published model class, not a stand-in
    assert {p.device.type for p in model.parameters()} == {"meta"}
    size, tolerance = PUBLISHED_SIZES[name]
    shape = memory.shape_of(model, name, memory.config_dir(name))
    assert abs(shape.parameters - size) <= tolerance * size, (name, shape.parameters)
    text = published.get("text_config", published)
    assert shape.layers == text["num_hidden_layers"] and shape.hidden == text["hidden_size"]


def test_hand_computation_qwen3_5_linear_layers():
    """Qwen3.5-9B: 3 of 4 layers are Gated DeltaNet. Layer types counted here from the JSON;
    only the 8 full-attention layers are compressed, the 24 linear ones keep a fixed state."""
    text = _published("qwen3.5-9b")["text_config"]
    kinds = text["layer_types"]
    full, linear = kinds.count("full_attention"), kinds.count("linear_attention")
    assert (full, linear) == (8, 24) and full + linear == text["num_hidden_layers"]
    entry = 2 * full * text["num_key_value_heads"] * text["head_dim"] * 2  # K and V, bf16: bytes per token
    assert entry == 2 * 8 * 4 * 256 * 2 == 32_768
    conv = (2 * text["linear_num_key_heads"] * text["linear_key_head_dim"]
            + text["linear_num_value_heads"] * text["linear_value_head_dim"]) * text["linear_conv_kernel_dim"]
    recurrent = text["linear_num_value_heads"] * text["linear_key_head_dim"] * text["linear_value_head_dim"]
    state = linear * (conv * 2 + recurrent * 4)  # conv state in bf16, recurrent state in float32
    assert state == 24 * ((2 * 16 * 128 + 32 * 128) * 4 * 2 + 32 * 128 * 128 * 4) == 51_904_512
    table = memory.rows("qwen3.5-9b", tokens=[4096], batches=[1, 8], methods=["full", "elastic", "h2o"], budgets=[0.2])
    full1, e1, h8 = pick(table, 4096, 1, "full"), pick(table, 4096, 1, "elastic"), pick(table, 4096, 8, "h2o")
    assert full1.layers == 8 and full1.prefill_entries == 8 * 4096
    assert (full1.prefill_bytes, full1.allocated_bytes) == (4096 * entry, (4096 + 513) * entry)
    assert e1.allocated_bytes == (math.ceil(0.2 * 4608) + 1) * entry  # 923 slots per full-attention layer
    assert (full1.state_bytes, full1.window_bytes, e1.state_bytes) == (state, 0, state)  # the same for every method
    assert h8.state_bytes == 8 * state and h8.cache_bytes == h8.allocated_bytes + 8 * state
    assert e1.cache_bytes / full1.cache_bytes > 0.3  # a fifth of the KV, but the fixed state stays


def test_hand_computation_gemma3_sliding_layers():
    """Gemma 3 4B: every sixth layer is global, the other five slide over 1024 tokens (the
    model card's 5:1 pattern; the JSON gives 34 layers and the window, transformers' defaults
    the 8 query / 4 KV heads of 256 the card lists)."""
    text = _published("gemma-3-4b-it")["text_config"]
    n, window = text["num_hidden_layers"], text["sliding_window"]
    full = sum((i + 1) % 6 == 0 for i in range(n))
    assert (n, window, full) == (34, 1024, 5)
    shape = memory.model_shape("gemma-3-4b-it")
    assert [i for i, kind in enumerate(shape.layer_types) if kind == "full_attention"] == [5, 11, 17, 23, 29]
    entry = 2 * 4 * 256 * 2  # one token's K and V in one layer, bf16
    table = memory.rows("gemma-3-4b-it", tokens=[1024, 4096], batches=[8], methods=["full", "elastic"], budgets=[0.2])
    for T in (1024, 4096):
        f, e = pick(table, T, 8, "full"), pick(table, T, 8, "elastic")
        assert f.allocated_bytes == 8 * full * (T + 513) * entry
        assert e.allocated_bytes == 8 * full * (math.ceil(0.2 * (T + 512)) + 1) * entry
        # 29 sliding layers keep the last W - 1 = 1023 of the T + 511 tokens seen, whatever the method
        assert f.window_bytes == e.window_bytes == 8 * (n - full) * 1023 * entry
        assert f.state_bytes == 0
    f, e = pick(table, 4096, 8, "full"), pick(table, 4096, 8, "elastic")
    # Elastic keeps a fifth of the global layers' K/V, yet the whole cache only shrinks to 65%.
    assert e.cache_bytes / f.cache_bytes == (5 * 923 + 29 * 1023) / (5 * 4609 + 29 * 1023)


def test_gemma3_12b_lists_the_published_layer_pattern():
    """The 12B file is the published configuration as transformers 4.57 saves it (SOURCE.md): it lists
    its 48 layer types, which the compact hub file (like the 4B / 27B ones here) leaves to
    Gemma3TextConfig's pattern, every sixth layer global. Both must give the same layers."""
    text = _published("gemma-3-12b-it")["text_config"]
    pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(48)]
    assert text["num_hidden_layers"] == 48 and text["layer_types"] == pattern
    shape = memory.model_shape("gemma-3-12b-it")
    assert list(shape.layer_types) == pattern and shape.windows == (1024,) * 40
    assert (shape.kv_heads, shape.head_dim) == (text["num_key_value_heads"], text["head_dim"]) == (8, 256)


def test_hand_computation_lfm2_conv_layers():
    text = _published("lfm2.5-vl-1.6b")["text_config"]
    conv = text["layer_types"].count("conv")
    (row,) = memory.rows("lfm2.5-vl-1.6b", tokens=[1024], batches=[1], methods=["full"])
    assert row.layers == text["layer_types"].count("full_attention") == 6
    assert row.state_bytes == conv * text["hidden_size"] * text["conv_L_cache"] * 2 == 10 * 2048 * 3 * 2
    assert row.spans["image"] == (0, 256)  # one 512 x 512 tile: (512 / 16 / 2)^2


def test_new_families_image_tokens():
    assert memory.image_tokens(memory.model_shape("qwen2.5-vl-7b")) == (448 // 14) ** 2 // 4
    assert memory.image_tokens(memory.model_shape("qwen3-vl-8b"), (448, 640)) == (448 // 32) * (640 // 32)
    assert memory.image_tokens(memory.model_shape("gemma-3-27b-it")) == 256


def _tiny_hybrids():
    """Tiny random models of the three hybrid decoders (4 layers, hidden 64), with the JSON
    of the published configuration's layer pattern in miniature."""
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Lfm2VlConfig,
                              Lfm2VlForConditionalGeneration, Qwen3_5Config, Qwen3_5ForConditionalGeneration)

    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=2, eos_token_id=3, pad_token_id=1)
    torch.manual_seed(0)
    gemma = Gemma3ForConditionalGeneration(Gemma3Config(
        text_config=dict(base, head_dim=16, layer_types=["sliding_attention"] * 3 + ["full_attention"],
                         sliding_window=8, query_pre_attn_scalar=16),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
        mm_tokens_per_image=4, boi_token_index=100, eoi_token_index=101, image_token_index=102))
    qwen = Qwen3_5ForConditionalGeneration(Qwen3_5Config(
        text_config=dict(base, head_dim=16, layer_types=["linear_attention"] * 3 + ["full_attention"],
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True, "partial_rotary_factor": 1.0},
                         linear_conv_kernel_dim=3, linear_key_head_dim=8, linear_value_head_dim=16,
                         linear_num_key_heads=2, linear_num_value_heads=4),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                           num_position_embeddings=64),
        image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123))
    lfm = Lfm2VlForConditionalGeneration(Lfm2VlConfig(
        text_config=dict(base, model_type="lfm2", layer_types=["conv", "full_attention", "conv", "conv"],
                         conv_L_cache=3),
        vision_config=dict(model_type="siglip2_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, patch_size=4, num_patches=64),
        downsample_factor=2, image_token_id=102, projector_hidden_size=64))
    return {"gemma3": gemma.eval(), "qwen3_5": qwen.eval(), "lfm2_vl": lfm.eval()}


def _held_bytes(cache) -> dict:
    """Bytes a transformers cache holds, by what holds them (read from its layers' tensors)."""
    from transformers.cache_utils import DynamicSlidingWindowLayer, LinearAttentionCacheLayerMixin

    held = {"full": 0, "window": 0, "state": 0}
    for layer in cache.layers:
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            states = list(layer.conv_states.values()) + list(layer.recurrent_states.values())
            held["state"] += sum(x.nelement() * x.element_size() for x in states if x is not None)
        elif layer.is_initialized:
            kind = "window" if isinstance(layer, DynamicSlidingWindowLayer) else "full"
            held[kind] += sum(x.nelement() * x.element_size() for x in (layer.keys, layer.values))
    return held


def test_hybrid_accounting_matches_transformers_cache():
    """The calculator's window and state bytes are what transformers' own cache holds after
    a real generate of a tiny model of each hybrid family (bfloat16: the recurrent state is
    float32 whatever the model dtype, the conv state follows the model)."""
    B, T, new, dtype = 2, 14, 4, "bfloat16"  # 17 tokens seen: more than the window of 8
    for name, model in _tiny_hybrids().items():
        model = model.to(getattr(torch, dtype))
        ids = torch.randint(5, 100, (B, T), generator=torch.Generator().manual_seed(0))
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, return_dict_in_generate=True, pad_token_id=1)
        held = _held_bytes(out.past_key_values)
        shape = memory.shape_of(model, name)
        (row,) = memory.rows(shape, [T], [B], ["full"], new=new, dtype=dtype, system=0, image=0)
        assert held["full"] == row.kv_bytes, name  # T + new - 1 entries in each full-attention layer
        assert held["window"] == row.window_bytes, name
        assert held["state"] == row.state_bytes, name
        assert (held["window"] > 0) == (name == "gemma3") and (held["state"] > 0) == (name != "gemma3")


def test_hybrid_accounting_matches_a_policy_cache():
    """The same with the library's cache at budget 0.5: compressed full-attention layers hold
    what the calculator says, the other layers what it reports apart."""
    B, T, new = 2, 14, 4
    for name, model in _tiny_hybrids().items():
        elastic.attach(model)
        ids = torch.randint(5, 100, (B, T), generator=torch.Generator().manual_seed(0))
        shape = memory.shape_of(model, name)
        (row,) = memory.rows(shape, [T], [B], ["elastic"], [0.5], new=new, dtype="float32", system=0, image=0)
        cache = elastic.make_cache("elastic", budget=0.5, reserve=new)
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=new,
                       min_new_tokens=new, do_sample=False, pad_token_id=1)
        assert cache.kv_bytes() == row.kv_bytes, name
        assert cache.allocated_bytes() == row.allocated_bytes, name
        assert cache.state_bytes() == row.other_bytes, name


def test_summary_across_models():
    """The cross-model table: Gemma 3 4B at 4k tokens, batch 8: Elastic 0.2 shrinks the 5
    global layers to 923 slots, the 29 sliding layers keep 1023 entries each."""
    text = memory.summary(models=["gemma-3-4b-it"], tokens=(4096,))
    saved = 1 - (5 * 923 + 29 * 1023) / (5 * 4609 + 29 * 1023)
    compressible = 5 * 4609 / (5 * 4609 + 29 * 1023)
    assert f"| gemma-3-4b-it | 5 / 29 / 0 | 4096 | " in text
    assert text.endswith(f" | {saved:.1%} | {compressible:.1%} |")
