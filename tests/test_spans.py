"""elastic.prompt_spans / image_tiles on layouts the family grid does not cover, and how
span-reading policies get their spans through plain ``model.generate``.

References are independent of :mod:`elastic.spans`: hand-built token layouts, and the
models' own image features (LLaVA-NeXT / OneVision count their anyres tokens themselves).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import elastic
import families
from tiny import tiny_llava


def anyres_model(kind: str, pinpoints):
    fam = families.llava_next() if kind == "llava_next" else families.llava_onevision()
    fam.model.config.image_grid_pinpoints = pinpoints
    return fam.model


@pytest.mark.parametrize("kind,pinpoints,size", [
    ("llava_next", families.PINPOINTS, [20, 32]),  # unpadded: the grid loses rows
    ("llava_next", families.PINPOINTS, [32, 11]),  # unpadded: the grid loses columns
    ("llava_onevision", families.PINPOINTS, [20, 32]),
    ("llava_onevision", [[16, 192], [192, 16]], [16, 190]),  # 12 tiles > anyres_max_9: scaled down
])
def test_anyres_grids_hold_exactly_the_models_image_features(kind, pinpoints, size):
    model = anyres_model(kind, pinpoints)
    patches = image_size_to_num_patches(size, pinpoints, 16)
    pixel_values = torch.randn(1, patches, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixel_values, image_sizes=torch.tensor([size]))
    n = features.pooler_output[0].shape[0]  # the model's own count of image tokens for this image
    ids = torch.tensor([[5] * 4 + [102] * n + [6] * 3])
    tiles = elastic.image_tiles({"input_ids": ids, "image_sizes": torch.tensor([size])}, model)
    assert [t.kind for t in tiles] == ["base", "anyres"]
    base, anyres = tiles
    assert (base.rows, base.cols) == (2, 2) and base.positions == tuple(range(4, 8))
    # The anyres rows end with a newline token: cells plus one newline per row are the rest.
    assert anyres.rows * (anyres.cols + 1) == n - 4
    assert anyres.positions[:anyres.cols] == tuple(range(8, 8 + anyres.cols))
    assert anyres.rows == 1 or anyres.positions[anyres.cols] == 8 + anyres.cols + 1  # the newline is skipped
    if kind == "llava_onevision" and size == [16, 190]:  # the model really scaled the grid down
        assert anyres.rows * anyres.cols < 12 * 4


def test_several_pixtral_images_of_different_sizes():
    fam = families.mistral3()
    ids, image_rows = [7, 8], []
    for rows, cols in ((2, 3), (3, 1)):
        cells = []
        for r in range(rows):
            cells += list(range(len(ids), len(ids) + cols))
            ids += [102] * cols + ([100] if r < rows - 1 else [101])  # [IMG]... [IMG_BREAK] / [IMG_END]
        image_rows.append((rows, cols, tuple(cells)))
        ids += [9]
    inputs = {"input_ids": torch.tensor([ids]), "image_sizes": torch.tensor([[16 * 2, 16 * 3], [16 * 3, 16]])}
    fam.model.config.vision_config.patch_size = 8  # 8 x 2 merge = 16 pixels per token
    tiles = elastic.image_tiles(inputs, fam.model)
    assert [(t.rows, t.cols, t.positions) for t in tiles] == image_rows
    first, last = image_rows[0][2][0], image_rows[-1][2][-1] + 1
    assert elastic.prompt_spans(inputs, fam.model) == {"system": (0, first), "image": (first, last),
                                                      "instruction": (last, len(ids))}
    assert elastic.prompt_annotations(fam.model, inputs)["image_grid"] is None  # two grids


def test_unsplit_smolvlm_image_starts_at_its_global_marker():
    fam = families.smolvlm()
    ids = [5, 6, 100, 101] + [102] * 4 + [100, 7]  # <fake><global-img><image> x 4 <fake>
    inputs = {"input_ids": torch.tensor([ids])}
    assert elastic.prompt_spans(inputs, fam.model) == {"system": (0, 3), "image": (3, 8), "instruction": (8, 10)}
    annotations = elastic.prompt_annotations(fam.model, inputs)
    assert annotations["image_grid"] == (2, 2) and annotations["image_tiles"][0].positions == (4, 5, 6, 7)
    assert annotations["image_tiles"][0].kind == "global"


def test_lfm2_tiles_without_markers_split_by_spatial_shapes():
    fam = families.lfm2_vl()
    ids = [5, 100] + [102] * (4 + 4 + 6) + [101, 6]  # use_image_special_tokens off inside: tiles back to back
    inputs = {"input_ids": torch.tensor([ids]), "spatial_shapes": torch.tensor([[4, 4], [4, 4], [4, 6]])}
    tiles = elastic.image_tiles(inputs, fam.model)
    assert [(t.rows, t.cols, t.positions[0]) for t in tiles] == [(2, 2, 2), (2, 2, 6), (2, 3, 10)]
    assert elastic.prompt_spans(inputs, fam.model)["image"] == (2, 16)  # no marker before the first tile


def test_llava_square_run_and_text_only_prompts():
    model, _ = tiny_llava()
    ids = torch.tensor([[2, 5, 6] + [4] * 16 + [7, 8]])
    annotations = elastic.prompt_annotations(model, {"input_ids": ids})
    assert annotations["spans"] == {"system": (0, 3), "image": (3, 19), "instruction": (19, 21)}
    assert annotations["image_grid"] == (4, 4)
    assert annotations["image_tiles"] == [elastic.ImageTile(4, 4, tuple(range(3, 19)))]
    text = elastic.prompt_annotations(model, {"input_ids": torch.tensor([[2, 5, 6]])})
    assert text == {"spans": {"instruction": (0, 3)}, "image_grid": None, "image_tiles": []}


# -- span-reading policies through plain model.generate -----------------------------------------------
def llava_batch(offsets):
    """Rows with the 16 image tokens after ``offset`` text tokens, all rows 24 tokens long."""
    g = torch.Generator().manual_seed(2)
    rows = [[2] + torch.randint(5, 20, (k,), generator=g).tolist() + [4] * 16
            + torch.randint(5, 20, (7 - k,), generator=g).tolist() for k in offsets]
    ids = torch.tensor(rows)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(len(offsets), 3, 32, 32, generator=g)}


@pytest.fixture(scope="module")
def llava():
    model, _ = tiny_llava()
    return elastic.attach(model)


def run(model, inputs, cache):
    with torch.no_grad():
        return model.generate(**inputs, cache=cache, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                              pad_token_id=1)


@pytest.mark.parametrize("method,params", [("vlcache", {}), ("lookm", {}), ("elastic", {"protect": "instruction"})])
def test_plain_generate_finds_the_spans(llava, method, params):
    inputs = llava_batch([3, 3])
    cache = elastic.make_cache(method, budget=0.5, **params)
    out = run(llava, inputs, cache)
    spans = {"system": (0, 4), "image": (4, 20), "instruction": (20, 24)}
    assert all(trace.spans == spans for trace in cache.traces)
    # The same decisions as with the spans annotated by hand before the prefill.
    annotated = elastic.make_cache(method, budget=0.5, **params)
    annotated.annotate(spans=spans)
    assert run(llava, inputs, annotated).tolist() == out.tolist()
    for ours, theirs in zip(cache.traces, annotated.traces):
        assert [layer.kept.tolist() for layer in ours.layers] == [layer.kept.tolist() for layer in theirs.layers]


def test_spans_annotated_before_the_prefill_win(llava):
    cache = elastic.make_cache("vlcache", budget=0.5)
    mine = {"system": (0, 2), "image": (2, 20), "instruction": (20, 24)}
    cache.annotate(spans=mine)
    run(llava, llava_batch([3]), cache)
    assert cache.trace.spans == mine


@pytest.mark.parametrize("method,params,match", [
    ("vlcache", {}, "vlcache needs the prompt's token spans"),
    ("lookm", {}, "lookm's text prior needs the prompt's token spans"),
    ("elastic", {"protect": "instruction"}, "protect='instruction' needs the prompt's token spans"),
])
def test_rows_with_different_spans_are_refused_with_the_fix(llava, method, params, match):
    cache = elastic.make_cache(method, budget=0.5, **params)
    with pytest.raises(ValueError, match=match) as error:
        run(llava, llava_batch([2, 4]), cache)  # the image sits elsewhere in each row
    assert "cache.annotate(spans=elastic.prompt_spans(inputs, model))" in str(error.value)


def test_lookm_without_text_prior_needs_no_spans(llava):
    cache = elastic.make_cache("lookm", budget=0.5, text_prior=False)
    run(llava, llava_batch([2, 4]), cache)
    assert cache.spans is None


def test_trace_carries_the_tiles(llava):
    inputs = llava_batch([3])
    cache = elastic.make_cache("elastic", budget=0.5)
    cache.annotate(**elastic.prompt_annotations(llava, inputs))
    run(llava, inputs, cache)
    trace = cache.trace
    assert trace.image_grid == (4, 4) and trace.image_tiles == [elastic.ImageTile(4, 4, tuple(range(4, 20)))]


# -- the families' own processors (built offline, tests/test_processors.py) ---------------------------
def test_spans_of_smolvlm_processor_output(tmp_path):
    """SmolVLM's own processor on a 32x16 image: two tiles behind <row_1_col_c> and the global
    image behind <global-img>; the image span starts at <row_1_col_1> and ends after the last
    <image>, and the tiles are the processor's runs of <image> tokens."""
    import transformers
    from test_processors import family_vocab, process, save_checkpoint, tiny_text, tiny_vision

    tokens = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
              "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"}
    markers = ["<row_1_col_1>", "<row_1_col_2>"]
    vocab = family_vocab(tokens, markers)
    config = transformers.SmolVLMConfig(text_config=dict(model_type="llama", **tiny_text()), scale_factor=2,
                                        vision_config=tiny_vision(image_size=16, patch_size=4),
                                        image_token_id=vocab["<image>"])
    image_processor = transformers.SmolVLMImageProcessorPil(
        do_image_splitting=True, size={"longest_edge": 32}, max_image_size={"longest_edge": 16})
    save_checkpoint(tmp_path, vocab, config, image_processor, tokens, "<image>",
                    options={"processor_class": "SmolVLMProcessor", "image_seq_len": 4})
    _, inputs = process(tmp_path, Image.new("RGB", (32, 16), "red"))
    ids = inputs["input_ids"][0].tolist()
    images = [p for p, i in enumerate(ids) if i == vocab["<image>"]]
    assert elastic.prompt_spans(inputs, config)["image"] == (ids.index(vocab["<row_1_col_1>"]), images[-1] + 1)
    tiles = elastic.image_tiles(inputs, config)
    assert [t.positions for t in tiles] == [tuple(images[k:k + 4]) for k in (0, 4, 8)]
    assert ids[tiles[-1].positions[0] - 1] == vocab["<global-img>"]
    assert [t.kind for t in tiles] == ["tile", "tile", "global"]


def test_spans_of_qwen2_5_vl_processor_output(tmp_path):
    """Qwen2.5-VL's own processor on a 32x24 image: one grid of image_grid_thw / merge."""
    import transformers
    from test_processors import QWEN, QWEN_IMAGE, family_vocab, merged_patch_config, process, save_checkpoint

    vocab = family_vocab(QWEN)
    config = merged_patch_config("qwen2_5_vl", vocab)
    save_checkpoint(tmp_path, vocab, config, transformers.Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=8 * 8, max_pixels=64 * 64), QWEN, QWEN_IMAGE)
    _, inputs = process(tmp_path, Image.new("RGB", (32, 24), "red"))
    ids = inputs["input_ids"][0].tolist()
    images = [p for p, i in enumerate(ids) if i == vocab["<|image_pad|>"]]
    _, h, w = inputs["image_grid_thw"][0].tolist()
    annotations = elastic.prompt_annotations(config, inputs)
    assert annotations["spans"]["image"] == (images[0], images[-1] + 1)
    assert annotations["image_grid"] == (h // 2, w // 2) and len(images) == h * w // 4


def test_two_adjacent_llama4_images_each_end_with_their_global_view():
    fam = families.llama4()
    boi, eoi, patch, x_sep, y_sep, whole = 100, 101, 102, 103, 104, 105
    ids = ([5, boi] + [patch] * 4 + [x_sep] + [patch] * 4 + [y_sep, whole] + [patch] * 4 + [eoi]
           + [boi, whole] + [patch] * 4 + [eoi, 6])  # a split image, then an unsplit one right after it
    tiles = elastic.image_tiles({"input_ids": torch.tensor([ids])}, fam.model.config)
    assert [t.kind for t in tiles] == ["tile", "tile", "global", "global"]
    assert [t.positions[0] for t in tiles] == [2, 7, 13, 20]
    assert elastic.prompt_spans({"input_ids": torch.tensor([ids])}, fam.model.config)["image"] == (2, 24)
