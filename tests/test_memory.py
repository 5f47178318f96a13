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
