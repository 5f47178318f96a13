"""The models' own processors, loaded offline without torchvision (elastic.processors).

For each family a local directory is written the way a hub checkpoint lays it out: the
model's config.json (a tiny model), a word-level tokenizer with the family's special tokens,
the PIL image processor's preprocessor_config.json, the processor's options and a chat
template. ``load_processor`` builds the processor from it; one image and a prompt go through.
Two independent references check the image tokens and markers: a count by hand from the
model's config and the image processor's outputs (grid products / merge, tiles x tokens per
tile, the model's own anyres packing), and the tiny model itself, whose forward pass accepts
the inputs only if the image tokens match its image features one for one.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import transformers
from PIL import Image
from tiny import CHAT_TEMPLATE, SPECIALS, WORDS
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast
from transformers.utils import is_torchvision_available

from elastic.models import load_processor
from elastic.processors import without_video

pytestmark = pytest.mark.skipif(is_torchvision_available(), reason="checks the path without torchvision")

QWEN = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "vision_start_token": "<|vision_start|>",
        "vision_end_token": "<|vision_end|>"}
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}  # head_dim 16


def tiny_text(**extra) -> dict:
    return {**dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=2, eos_token_id=3,
                   pad_token_id=1), **extra}


def tiny_vision(**extra) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, **extra)


def family_vocab(named_tokens, extra_tokens=()):
    """Word vocabulary plus the family's special tokens (ids below 64)."""
    specials = list(dict.fromkeys([*named_tokens.values(), *extra_tokens]))
    return {w: i for i, w in enumerate(SPECIALS + [w for w in WORDS if w] + specials)}


def save_checkpoint(path, vocab, config, image_processor, named_tokens, image_prompt, options=None):
    """Write a checkpoint directory: config, tokenizer, image processor, processor options, template."""
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", extra_special_tokens=named_tokens)
    tokenizer.add_special_tokens({"additional_special_tokens": [w for w in vocab if w not in SPECIALS + WORDS]})
    tokenizer.save_pretrained(path)
    config.save_pretrained(path)
    image_processor.save_pretrained(path)
    if options:
        (path / "processor_config.json").write_text(json.dumps(options))
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE.replace(" <image>", " " + image_prompt))


def process(path, image):
    processor = load_processor(str(path))
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour ?"}]}],
        add_generation_prompt=True, tokenize=False)
    return processor, processor(text=prompt, images=[image], return_tensors="pt")


def model_accepts(config, inputs):
    """The tiny model runs one forward pass on the processor's output: the model checks that
    the image tokens match its image features (``get_placeholder_mask``) and, for the Qwen
    family, lays out its 3-D positions from the same grid."""
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).eval()
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[:2] == inputs["input_ids"].shape


def counts(inputs, vocab, tokens):
    ids = inputs["input_ids"][0]
    return {t: int((ids == vocab[t]).sum()) for t in tokens}


def image_run(inputs, vocab, token):
    """(start, end) of the image tokens, asserting they form one unbroken run."""
    where = (inputs["input_ids"][0] == vocab[token]).nonzero().flatten()
    assert len(where) and where[-1] - where[0] + 1 == len(where)
    return int(where[0]), int(where[-1]) + 1


# ---------------------------------------------------------------- merged patches (Qwen, GLM-4V)

QWEN_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                   temporal_patch_size=2, in_channels=3, out_hidden_size=64)


def merged_patch_config(family, vocab):
    if family == "glm4v":  # rotary on half of head_dim 16, so the three sections cover 4 frequencies
        return transformers.Glm4vConfig(
            text_config=tiny_text(rope_parameters={**MROPE, "partial_rotary_factor": 0.5, "mrope_section": [1, 1, 2]}),
            vision_config=dict(QWEN_VISION, image_size=32), image_token_id=vocab["<|image|>"],
            video_token_id=vocab["<|video|>"], image_start_token_id=vocab["<|begin_of_image|>"],
            image_end_token_id=vocab["<|end_of_image|>"], video_start_token_id=vocab["<|begin_of_video|>"],
            video_end_token_id=vocab["<|end_of_video|>"])
    ids = dict(image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
               vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"])
    interleaved = {**MROPE, "mrope_interleaved": True}
    if family == "qwen2_vl":
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                      temporal_patch_size=2)
        return transformers.Qwen2VLConfig(text_config=tiny_text(rope_parameters=MROPE), vision_config=vision, **ids)
    if family == "qwen2_5_vl":
        return transformers.Qwen2_5_VLConfig(text_config=tiny_text(rope_parameters=MROPE), **ids,
                                             vision_config=dict(QWEN_VISION, window_size=16, fullatt_block_indexes=[0]))
    if family == "qwen3_vl":
        return transformers.Qwen3VLConfig(text_config=tiny_text(rope_parameters=interleaved), **ids,
                                          vision_config=dict(QWEN_VISION, num_position_embeddings=64,
                                                             deepstack_visual_indexes=[0]))
    text = tiny_text(rope_parameters={**interleaved, "partial_rotary_factor": 1.0},
                     layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=2,
                     linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                     num_hidden_layers=2)
    return transformers.Qwen3_5Config(text_config=text, vision_config=dict(QWEN_VISION, num_position_embeddings=64),
                                      **ids)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "glm4v"])
def test_merged_patch_families(tmp_path, family):
    """Qwen2/2.5/3-VL, Qwen3.5 and GLM-4V: one placeholder per merged 2x2 patch group.

    A 32x24 image with patch 4 and merge 2 (a factor 8, inside min/max pixels) keeps its
    size: a 6x8 patch grid, 48 patches, 12 image tokens between the start and end markers.
    """
    tokens, image_prompt = QWEN, QWEN_IMAGE
    if family == "glm4v":
        tokens = {"image_token": "<|image|>", "video_token": "<|video|>"}
        image_prompt = "<|begin_of_image|><|image|><|end_of_image|>"
        image_processor = transformers.Glm4vImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                                              size={"shortest_edge": 8 * 8, "longest_edge": 64 * 64})
    else:
        image_processor = transformers.Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                                                min_pixels=8 * 8, max_pixels=64 * 64)
    vocab = family_vocab(tokens, ["<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>"])
    config = merged_patch_config(family, vocab)
    save_checkpoint(tmp_path, vocab, config, image_processor, tokens, image_prompt)
    processor, inputs = process(tmp_path, Image.new("RGB", (32, 24), "red"))
    assert isinstance(processor, getattr(transformers, transformers.models.auto.processing_auto
                                         .PROCESSOR_MAPPING_NAMES[family]))
    assert inputs["image_grid_thw"][0].tolist() == [1, 24 // 4, 32 // 4]  # by hand: 32x24 is a multiple of 8
    assert inputs["pixel_values"].shape[0] == 1 * 6 * 8
    start, end = image_run(inputs, vocab, tokens["image_token"])
    assert end - start == 6 * 8 // config.vision_config.spatial_merge_size ** 2 == 12
    open_, close = image_prompt.split(tokens["image_token"])
    ids = inputs["input_ids"][0]
    assert ids[start - 1] == vocab[open_] and ids[end] == vocab[close]
    model_accepts(config, inputs)


def test_model_refuses_a_wrong_count(tmp_path):
    """The model check can fail: one image token fewer than the grid is refused by the model."""
    vocab = family_vocab(QWEN)
    config = merged_patch_config("qwen2_vl", vocab)
    save_checkpoint(tmp_path, vocab, config, transformers.Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=8 * 8, max_pixels=64 * 64), QWEN, QWEN_IMAGE)
    _, inputs = process(tmp_path, Image.new("RGB", (32, 24), "red"))
    start, _ = image_run(inputs, vocab, "<|image_pad|>")
    keep = torch.ones(inputs["input_ids"].shape[1], dtype=torch.bool)
    keep[start] = False
    short = {**inputs, **{k: inputs[k][:, keep] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}}
    with pytest.raises(ValueError, match="image tokens do not match"):
        model_accepts(config, short)


# ---------------------------------------------------------------- tiles (InternVL, SmolVLM)

def test_internvl_tiles(tmp_path):
    """InternVL: a 32x16 image on 16x16 tiles is two tiles plus the thumbnail; each tile is
    (image_size / patch)^2 x downsample_ratio^2 = (16/4)^2 / 4 = 4 tokens, inside <img> ... </img>."""
    tokens = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
              "video_token": "<video>"}
    vocab = family_vocab(tokens)
    per_tile = int((16 // 4) ** 2 * 0.5 ** 2)
    config = transformers.InternVLConfig(
        text_config=dict(model_type="qwen2", **tiny_text()), downsample_ratio=0.5, image_seq_length=per_tile,
        vision_config=tiny_vision(image_size=[16, 16], patch_size=[4, 4]), image_token_id=vocab["<IMG_CONTEXT>"])
    image_processor = transformers.GotOcr2ImageProcessorPil(size={"height": 16, "width": 16}, crop_to_patches=True,
                                                            min_patches=1, max_patches=4)
    save_checkpoint(tmp_path, vocab, config, image_processor, tokens, "<IMG_CONTEXT>",
                    options={"processor_class": "InternVLProcessor", "image_seq_length": per_tile})
    processor, inputs = process(tmp_path, Image.new("RGB", (32, 16), "red"))
    assert isinstance(processor, transformers.InternVLProcessor)
    assert inputs["pixel_values"].shape[:2] == (3, 3)  # 2 tiles + thumbnail, RGB
    found = counts(inputs, vocab, ["<img>", "</img>", "<IMG_CONTEXT>"])
    assert found == {"<img>": 1, "</img>": 1, "<IMG_CONTEXT>": 3 * per_tile}
    start, end = image_run(inputs, vocab, "<IMG_CONTEXT>")
    assert inputs["input_ids"][0, start - 1] == vocab["<img>"] and inputs["input_ids"][0, end] == vocab["</img>"]
    model_accepts(config, inputs)


def test_smolvlm_tiles_and_row_markers(tmp_path):
    """SmolVLM: a 32x16 image on 16x16 tiles is one row of two tiles plus the global image,
    each (image_size / patch)^2 / scale_factor^2 = 16 / 4 = 4 tokens; a <row_r_col_c> marker
    opens each tile and <global-img> the global one."""
    tokens = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
              "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"}
    markers = ["<row_1_col_1>", "<row_1_col_2>", "<row_2_col_1>"]
    vocab = family_vocab(tokens, markers)
    config = transformers.SmolVLMConfig(text_config=dict(model_type="llama", **tiny_text()), scale_factor=2,
                                        vision_config=tiny_vision(image_size=16, patch_size=4),
                                        image_token_id=vocab["<image>"])
    per_tile = (16 // 4) ** 2 // config.scale_factor ** 2
    image_processor = transformers.SmolVLMImageProcessorPil(
        do_image_splitting=True, size={"longest_edge": 32}, max_image_size={"longest_edge": 16})
    save_checkpoint(tmp_path, vocab, config, image_processor, tokens, "<image>",
                    options={"processor_class": "SmolVLMProcessor", "image_seq_len": per_tile})
    processor, inputs = process(tmp_path, Image.new("RGB", (32, 16), "red"))
    assert isinstance(processor, transformers.SmolVLMProcessor)
    assert inputs["pixel_values"].shape[:2] == (1, 3)  # one image: 2 tiles + global
    found = counts(inputs, vocab, ["<image>", "<global-img>", "<fake_token_around_image>", *markers])
    assert found == {"<image>": 3 * per_tile, "<global-img>": 1, "<fake_token_around_image>": 4,
                     "<row_1_col_1>": 1, "<row_1_col_2>": 1, "<row_2_col_1>": 0}
    model_accepts(config, inputs)


# ---------------------------------------------------------------- anyres (LLaVA-NeXT, OneVision)

PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32]]


def anyres_tokens(model_class, config, inputs, **kwargs):
    """The image features the model packs for ``inputs`` (its own pack_image_features, fed
    zero features of the right shape): base tile + unpadded grid + one newline per row."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    tiles = inputs["pixel_values"].shape[1]
    features = [torch.zeros(tiles, side * side, 1)]
    _, lengths = model_class.pack_image_features(SimpleNamespace(config=config), features, inputs["image_sizes"],
                                                 image_newline=torch.zeros(1), **kwargs)
    return int(lengths[0])


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_anyres_families(tmp_path, family):
    """LLaVA-NeXT / OneVision: a 32x16 image picks the 16x32 (h x w) pinpoint: a base tile and
    two grid tiles of (16/4)^2 = 16 features, the grid 4 x 8 plus 4 newlines: 16 + 32 + 4 = 52."""
    tokens = {"image_token": "<image>", "video_token": "<video>"}
    vocab = family_vocab(tokens)
    vision = tiny_vision(image_size=16, patch_size=4)
    common = dict(image_grid_pinpoints=PINPOINTS, image_token_index=vocab["<image>"], vision_feature_layer=-1)
    if family == "llava_next":
        config = transformers.LlavaNextConfig(vision_config=dict(model_type="clip_vision_model", **vision),
                                              text_config=dict(model_type="llama", **tiny_text()),
                                              vision_feature_select_strategy="default", **common)
        image_processor = transformers.LlavaNextImageProcessorPil(
            size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_grid_pinpoints=PINPOINTS)
        options = {"processor_class": "LlavaNextProcessor", "patch_size": 4, "num_additional_image_tokens": 1,
                   "vision_feature_select_strategy": "default"}
        model_class, kwargs = transformers.LlavaNextModel, {"vision_feature_select_strategy": "default"}
    else:
        config = transformers.LlavaOnevisionConfig(vision_config=dict(model_type="siglip_vision_model", **vision),
                                                   text_config=dict(model_type="qwen2", **tiny_text()),
                                                   vision_feature_select_strategy="full",
                                                   video_token_index=vocab["<video>"], **common)
        image_processor = transformers.LlavaOnevisionImageProcessorPil(
            size={"height": 16, "width": 16}, image_grid_pinpoints=PINPOINTS)
        options = {"processor_class": "LlavaOnevisionProcessor", "num_image_tokens": 16,
                   "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9"}
        model_class, kwargs = transformers.LlavaOnevisionModel, {"vision_aspect_ratio": "anyres_max_9"}
    save_checkpoint(tmp_path, vocab, config, image_processor, tokens, "<image>", options=options)
    processor, inputs = process(tmp_path, Image.new("RGB", (32, 16), "red"))
    assert type(processor).__name__ == options["processor_class"]
    assert inputs["pixel_values"].shape[1] == 3  # base + 1 x 2 grid tiles
    expected = anyres_tokens(model_class, config, inputs, **kwargs)
    assert expected == 16 + 4 * 8 + 4
    start, end = image_run(inputs, vocab, "<image>")
    assert end - start == expected
    model_accepts(config, inputs)


# ---------------------------------------------------------------- fixed count (Gemma 3)

def test_gemma3_fixed_count(tmp_path):
    """Gemma 3: mm_tokens_per_image image tokens between <start_of_image> and <end_of_image>."""
    tokens = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
    vocab = family_vocab(tokens)
    config = transformers.Gemma3Config(
        text_config=tiny_text(layer_types=["sliding_attention", "full_attention"], sliding_window=8,
                              num_hidden_layers=2, query_pre_attn_scalar=16),
        vision_config=dict(model_type="siglip_vision_model", **tiny_vision(image_size=16, patch_size=4)),
        mm_tokens_per_image=4, boi_token_index=vocab["<start_of_image>"], eoi_token_index=vocab["<end_of_image>"],
        image_token_index=vocab["<image_soft_token>"])
    image_processor = transformers.Gemma3ImageProcessorPil(size={"height": 16, "width": 16}, do_pan_and_scan=False)
    save_checkpoint(tmp_path, vocab, config, image_processor, tokens, "<start_of_image>",
                    options={"processor_class": "Gemma3Processor", "image_seq_length": config.mm_tokens_per_image})
    processor, inputs = process(tmp_path, Image.new("RGB", (32, 16), "red"))
    assert isinstance(processor, transformers.Gemma3Processor)
    start, end = image_run(inputs, vocab, "<image_soft_token>")
    assert end - start == config.mm_tokens_per_image
    ids = inputs["input_ids"][0]
    assert ids[start - 1] == vocab["<start_of_image>"] and ids[end] == vocab["<end_of_image>"]
    model_accepts(config, inputs)


# ---------------------------------------------------------------- refusals and the video-free class

@pytest.mark.parametrize("config_class", ["Lfm2VlConfig", "Llama4Config", "Mistral3Config"])
def test_families_that_need_torchvision_refused(tmp_path, config_class):
    """LFM2-VL's and Llama 4's image processors exist only for torchvision; Mistral 3's
    PixtralProcessor imports the torchvision image processor in its own module (5.24)."""
    getattr(transformers, config_class)().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="torchvision") as error:
        load_processor(str(tmp_path))
    assert "pip install torchvision" in str(error.value)


def test_without_video_keeps_the_class_saves_and_refuses_videos(tmp_path):
    """The video-free processor is the family's class, saves as transformers writes it (the
    sub-processor configs inside processor_config.json) and loads back the same; a video
    raises a clear error."""
    vocab = family_vocab(QWEN)
    config = merged_patch_config("qwen2_vl", vocab)
    save_checkpoint(tmp_path, vocab, config, transformers.Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=8 * 8, max_pixels=64 * 64), QWEN, QWEN_IMAGE)
    processor, inputs = process(tmp_path, Image.new("RGB", (32, 24), "red"))
    assert type(processor) is without_video(transformers.Qwen2VLProcessor)
    processor.save_pretrained(tmp_path / "saved")
    config.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "processor_config.json").read_text())["processor_class"] == \
        "Qwen2VLProcessor"
    _, again = process(tmp_path / "saved", Image.new("RGB", (32, 24), "red"))
    assert torch.equal(again["input_ids"], inputs["input_ids"])
    with pytest.raises(ValueError, match="torchvision"):
        processor(text="<|video_pad|>", videos=[torch.zeros(2, 3, 8, 8)], return_tensors="pt")


def test_load_model_generates_with_the_family_processor(tmp_path):
    """``elastic.load_model`` on a saved Qwen2.5-VL checkpoint: transformers' own processor
    class comes back, and ``elastic.generate`` with the full budget answers as plain greedy
    ``generate`` does on that processor's inputs."""
    import elastic
    from transformers import DynamicCache

    vocab = family_vocab(QWEN)
    config = merged_patch_config("qwen2_5_vl", vocab)
    save_checkpoint(tmp_path, vocab, config, transformers.Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=8 * 8, max_pixels=64 * 64), QWEN, QWEN_IMAGE)
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(tmp_path)
    model, processor = elastic.load_model(tmp_path, device="cpu")
    assert isinstance(processor, transformers.Qwen2_5_VLProcessor)
    image = Image.new("RGB", (32, 24), "red")
    result = elastic.generate(model, processor, image, "what colour ?", budget=1.0, max_new_tokens=4)
    prompt = processor.apply_chat_template([elastic.user_message("what colour ?", True)], add_generation_prompt=True,
                                           tokenize=False)
    inputs = processor(text=prompt, images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, cache=DynamicCache(), max_new_tokens=4, do_sample=False)
    expected = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert expected and result.text == expected
