"""Tiny random models of every vision-language family of transformers 5.24, and their inputs.

Each builder returns a :class:`Family`: the model (2 decoder layers, hidden 64, random
weights, no downloads) and a function that builds its model inputs by hand, laid out the
way the family's own processor lays them out (tiles, row markers, breaks, anyres newline
columns). Building them by hand keeps these tests independent of torchvision and of the
library's span detection: every builder records, as it writes the ids, which positions
are image tokens or image markers and which positions form each tile's grid. Those
records are the reference the span tests compare :func:`elastic.prompt_spans` against.

Special ids live in 100..127, prompt text in 5..99 (eos is 3: a prompt never contains it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

VOCAB = 128
BEFORE, AFTER = 6, 9  # text tokens before the first and after the last image


def text_config(**extra) -> dict:
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=2, eos_token_id=3,
                pad_token_id=1)
    base.update(extra)
    return base


MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}


@dataclass
class Layout:
    """Hand-built prompt: ids plus what the family's processor would have told us."""

    ids: list[int] = field(default_factory=list)
    image: list[int] = field(default_factory=list)  # positions that belong to an image (tokens and markers)
    tiles: list[tuple[int, int, list[int]]] = field(default_factory=list)  # (rows, cols, row-major positions)
    gen: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(1))

    def text(self, n: int) -> None:
        self.ids += torch.randint(5, 100, (n,), generator=self.gen).tolist()

    def token(self, i: int, image: bool = False) -> int:
        if image:
            self.image.append(len(self.ids))
        self.ids.append(i)
        return len(self.ids) - 1

    def run(self, i: int, n: int) -> list[int]:
        return [self.token(i, image=True) for _ in range(n)]

    def grid(self, rows: int, cols: int, positions: list[int]) -> None:
        assert len(positions) == rows * cols
        self.tiles.append((rows, cols, positions))

    def inputs(self, **extra) -> dict:
        ids = torch.tensor([self.ids])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **extra}


@dataclass
class Family:
    """A tiny model of one family and its hand-built prompts."""

    name: str
    model: torch.nn.Module
    build: Callable[[bool], tuple[dict, Layout]]  # with_image -> (inputs, layout)
    hybrid: bool = False  # mixes layer types (sliding / linear / conv / chunked with full)

    def inputs(self, with_image: bool) -> tuple[dict, Layout]:
        return self.build(with_image)


def text_only(layout: Layout | None = None) -> tuple[dict, Layout]:
    layout = layout or Layout()
    layout.text(BEFORE + AFTER)
    return layout.inputs(), layout


def _seeded(build):
    def wrapper(*args, **kwargs):
        torch.manual_seed(0)
        return build(*args, **kwargs).eval()
    return wrapper


# -- Qwen family: <vision_start> <image_pad> x (h/2)(w/2) <vision_end>, one grid per image ------------
QWEN_IMAGE, QWEN_VIDEO, QWEN_START, QWEN_END = 120, 121, 122, 123
QWEN_GRIDS = [(2, 3), (2, 2)]  # merged rows x cols of the two images


def qwen_vision(**extra) -> dict:
    return dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                temporal_patch_size=2, in_channels=3, out_hidden_size=64, **extra)


def qwen_build(with_image: bool, start=QWEN_START, image=QWEN_IMAGE, end=QWEN_END, extra_keys=()):
    layout = Layout()
    if not with_image:
        return text_only(layout)
    layout.text(BEFORE)
    for k, (rows, cols) in enumerate(QWEN_GRIDS):
        if k:
            layout.text(2)  # "and" between the two images
        layout.token(start)
        layout.grid(rows, cols, layout.run(image, rows * cols))
        layout.token(end)
    layout.text(AFTER)
    thw = torch.tensor([[1, 2 * r, 2 * c] for r, c in QWEN_GRIDS])
    patches = int(thw.prod(-1).sum())
    ids = torch.tensor([layout.ids])
    extra = {"pixel_values": torch.randn(patches, 3 * 2 * 4 * 4, generator=layout.gen), "image_grid_thw": thw}
    if "mm_token_type_ids" in extra_keys:
        extra["mm_token_type_ids"] = (ids == image).long()
    return layout.inputs(**extra), layout


def qwen2_5_vl() -> Family:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(text_config=text_config(rope_parameters=MROPE),
                              vision_config=qwen_vision(window_size=16, fullatt_block_indexes=[0]),
                              image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO,
                              vision_start_token_id=QWEN_START, vision_end_token_id=QWEN_END)
    model = _seeded(Qwen2_5_VLForConditionalGeneration)(config)
    return Family("qwen2_5_vl", model, lambda w: qwen_build(w, extra_keys=("mm_token_type_ids",)))


def qwen3_vl() -> Family:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = Qwen3VLConfig(text_config=text_config(rope_parameters={**MROPE, "mrope_interleaved": True}),
                           vision_config=qwen_vision(num_position_embeddings=64, deepstack_visual_indexes=[0]),
                           image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO,
                           vision_start_token_id=QWEN_START, vision_end_token_id=QWEN_END)
    model = _seeded(Qwen3VLForConditionalGeneration)(config)
    return Family("qwen3_vl", model, lambda w: qwen_build(w, extra_keys=("mm_token_type_ids",)))


def qwen3_5() -> Family:
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    text = text_config(rope_parameters={**MROPE, "mrope_interleaved": True, "partial_rotary_factor": 1.0},
                       layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=2,
                       linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                       linear_num_value_heads=4)
    config = Qwen3_5Config(text_config=text, vision_config=qwen_vision(num_position_embeddings=64),
                           image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO,
                           vision_start_token_id=QWEN_START, vision_end_token_id=QWEN_END)
    model = _seeded(Qwen3_5ForConditionalGeneration)(config)
    return Family("qwen3_5", model, lambda w: qwen_build(w, extra_keys=("mm_token_type_ids",)), hybrid=True)


def glm4v() -> Family:
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    start, end, image = 100, 101, 102
    config = Glm4vConfig(text_config=text_config(rope_parameters={**MROPE, "partial_rotary_factor": 0.5,
                                                                  "mrope_section": [1, 1, 2]}),
                         vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                                            spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                                            image_size=32),
                         image_token_id=image, video_token_id=103, image_start_token_id=start,
                         image_end_token_id=end, video_start_token_id=104, video_end_token_id=105)
    model = _seeded(Glm4vForConditionalGeneration)(config)
    return Family("glm4v", model, lambda w: qwen_build(w, start=start, image=image, end=end,
                                                       extra_keys=("mm_token_type_ids",)))


# -- Gemma 3: <start_of_image> <image> x mm_tokens_per_image <end_of_image>, one square grid per image --
def gemma3(sliding_window: int = 8) -> Family:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    boi, eoi, image = 100, 101, 102
    text = text_config(layer_types=["sliding_attention", "full_attention"], sliding_window=sliding_window,
                       query_pre_attn_scalar=16)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=8)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=boi,
                          eoi_token_index=eoi, image_token_index=image)
    model = _seeded(Gemma3ForConditionalGeneration)(config)

    def build(with_image):
        layout = Layout()
        if not with_image:
            return text_only(layout)
        layout.text(BEFORE)
        for k in range(2):  # two images (as pan-and-scan crops would give)
            if k:
                layout.text(2)
            layout.token(boi)
            layout.grid(2, 2, layout.run(image, 4))
            layout.token(eoi)
        layout.text(AFTER)
        ids = torch.tensor([layout.ids])
        return layout.inputs(pixel_values=torch.randn(2, 3, 32, 32, generator=layout.gen),
                             token_type_ids=(ids == image).long()), layout

    return Family("gemma3", model, build, hybrid=True)


# -- SmolVLM / Idefics3: <fake><row_i_col_j><image> x n per tile, "\n" per row, then the global image ---
def smolvlm() -> Family:
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    fake, global_img, image, newline = 100, 101, 102, 99
    rows_cols = {(r, c): 103 + 2 * r + c for r in range(2) for c in range(2)}  # <row_1_col_1> ...
    config = SmolVLMConfig(text_config=dict(model_type="llama", **text_config()),
                           vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, image_size=32, patch_size=8),
                           scale_factor=2, image_token_id=image)
    model = _seeded(SmolVLMForConditionalGeneration)(config)
    per_tile = (32 // 8) ** 2 // 4  # 4 tokens, a 2 x 2 grid

    def build(with_image):
        layout = Layout()
        if not with_image:
            return text_only(layout)
        layout.text(BEFORE)
        for r in range(2):  # a 2 x 2 split of the image
            for c in range(2):
                layout.token(fake, image=bool(r or c))  # the first <fake> opens the image
                layout.token(rows_cols[r, c], image=True)
                layout.grid(2, 2, layout.run(image, per_tile))
            layout.token(newline, image=True)
        layout.token(newline, image=True)
        layout.token(fake, image=True)
        layout.token(global_img, image=True)
        layout.grid(2, 2, layout.run(image, per_tile))
        layout.token(fake)  # closes the image
        layout.text(AFTER)
        return layout.inputs(pixel_values=torch.randn(1, 5, 3, 32, 32, generator=layout.gen),
                             pixel_attention_mask=torch.ones(1, 5, 32, 32, dtype=torch.bool)), layout

    return Family("smolvlm", model, build)


# -- InternVL: <img> <IMG_CONTEXT> x (n per tile x tiles) </img>, the last tile the thumbnail ------------
def internvl() -> Family:
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    start, end, image = 100, 101, 102
    config = InternVLConfig(text_config=dict(model_type="qwen2", **text_config()),
                            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=[32, 32], patch_size=[8, 8]),
                            downsample_ratio=0.5, image_token_id=image, image_seq_length=4)
    model = _seeded(InternVLForConditionalGeneration)(config)

    def build(with_image):
        layout = Layout()
        if not with_image:
            return text_only(layout)
        layout.text(BEFORE)
        layout.token(start)
        for _ in range(3):  # two tiles and the thumbnail
            layout.grid(2, 2, layout.run(image, 4))
        layout.token(end)
        layout.text(AFTER)
        return layout.inputs(pixel_values=torch.randn(3, 3, 32, 32, generator=layout.gen)), layout

    return Family("internvl", model, build)


# -- LLaVA-NeXT / OneVision: base image (side x side) then the anyres grid with a newline column --------
def _anyres_build(image):
    # image_sizes (H, W) = (32, 16) is exactly the pinpoint (32, 16): 2 x 1 tiles of 2 x 2 patches, so
    # the anyres features are 4 rows x 2 cols with no unpadding, plus one newline per row.
    def build(with_image):
        layout = Layout()
        if not with_image:
            return text_only(layout)
        layout.text(BEFORE)
        layout.grid(2, 2, layout.run(image, 4))  # base image
        cells = []
        for _ in range(4):
            cells += layout.run(image, 2)
            layout.run(image, 1)  # image_newline
        layout.grid(4, 2, cells)
        layout.text(AFTER)
        return layout.inputs(pixel_values=torch.randn(1, 3, 3, 16, 16, generator=layout.gen),
                             image_sizes=torch.tensor([[32, 16]])), layout
    return build


PINPOINTS = [[16, 32], [32, 16], [32, 32]]


def llava_next() -> Family:
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    image = 102
    config = LlavaNextConfig(vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=1, num_attention_heads=2, image_size=16,
                                                patch_size=8, projection_dim=32),
                             text_config=dict(model_type="llama", **text_config()), image_grid_pinpoints=PINPOINTS,
                             image_token_index=image, vision_feature_layer=-1,
                             vision_feature_select_strategy="default")
    return Family("llava_next", _seeded(LlavaNextForConditionalGeneration)(config), _anyres_build(image))


def llava_onevision() -> Family:
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    image = 102
    config = LlavaOnevisionConfig(vision_config=dict(model_type="siglip_vision_model", hidden_size=32,
                                                     intermediate_size=64, num_hidden_layers=1,
                                                     num_attention_heads=2, image_size=16, patch_size=8),
                                  text_config=dict(model_type="qwen2", **text_config()),
                                  image_grid_pinpoints=PINPOINTS, image_token_index=image, video_token_index=103,
                                  vision_feature_layer=-1, vision_feature_select_strategy="full")
    return Family("llava_onevision", _seeded(LlavaOnevisionForConditionalGeneration)(config), _anyres_build(image))


# -- Mistral 3 (Pixtral): [IMG] x cols then [IMG_BREAK] per row, [IMG_END] after the last row ------------
def mistral3(sliding_window: int | None = None) -> Family:
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    brk, end, image = 100, 101, 102
    config = Mistral3Config(vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2, head_dim=16,
                                               image_size=32, patch_size=4),
                            text_config=dict(model_type="mistral", sliding_window=sliding_window, **text_config()),
                            spatial_merge_size=2, image_token_index=image, vision_feature_layer=-1)
    model = _seeded(Mistral3ForConditionalGeneration)(config)
    rows, cols = 4, 3  # a 32 x 24 image: 8 x 6 patches of 4, merged 2 x 2

    def build(with_image):
        layout = Layout()
        if not with_image:
            return text_only(layout)
        layout.text(BEFORE)
        cells = []
        for r in range(rows):
            cells += layout.run(image, cols)
            if r < rows - 1:
                layout.token(brk, image=True)
        layout.token(end)
        layout.grid(rows, cols, cells)
        layout.text(AFTER)
        return layout.inputs(pixel_values=torch.randn(1, 3, 32, 24, generator=layout.gen),
                             image_sizes=torch.tensor([[32, 24]])), layout

    name = "mistral3" if sliding_window is None else "mistral3_sliding"
    return Family(name, model, build, hybrid=sliding_window is not None)


# -- LFM2-VL: <|image_start|> (<|img_row_i_col_j|> tile)... <|img_thumbnail|> thumbnail <|image_end|> -----
def lfm2_vl() -> Family:
    from transformers import Lfm2VlConfig, Lfm2VlForConditionalGeneration

    start, end, image, thumb = 100, 101, 102, 105
    markers = [103, 104]  # <|img_row_1_col_1|>, <|img_row_1_col_2|>
    text = dict(model_type="lfm2", **text_config(layer_types=["conv", "full_attention"], conv_L_cache=3))
    text.pop("head_dim")
    config = Lfm2VlConfig(vision_config=dict(model_type="siglip2_vision_model", hidden_size=32,
                                             intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                             patch_size=4, num_patches=64),
                          text_config=text, downsample_factor=2, image_token_id=image, projector_hidden_size=64)
    model = _seeded(Lfm2VlForConditionalGeneration)(config)
    shapes = [(4, 4), (4, 4), (4, 6)]  # patches of the two tiles and the thumbnail

    def build(with_image):
        layout = Layout()
        if not with_image:
            return text_only(layout)
        layout.text(BEFORE)
        layout.token(start)
        for marker, (h, w) in zip(markers + [thumb], shapes):
            layout.token(marker, image=True)
            layout.grid(h // 2, w // 2, layout.run(image, h * w // 4))
        layout.token(end)
        layout.text(AFTER)
        most = max(h * w for h, w in shapes)
        pixel_values = torch.zeros(len(shapes), most, 3 * 4 * 4)
        mask = torch.zeros(len(shapes), most, dtype=torch.bool)
        for k, (h, w) in enumerate(shapes):
            pixel_values[k, : h * w] = torch.randn(h * w, 48, generator=layout.gen)
            mask[k, : h * w] = True
        return layout.inputs(pixel_values=pixel_values, pixel_attention_mask=mask,
                             spatial_shapes=torch.tensor(shapes)), layout

    return Family("lfm2_vl", model, build, hybrid=True)


# -- Llama 4: <|image_start|> tile <|tile_x_separator|> tile <|tile_y_separator|> <|image|> global <|image_end|>
def llama4() -> Family:
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    boi, eoi, image, x_sep, y_sep, global_img = 100, 101, 102, 103, 104, 105
    text = text_config(attention_chunk_size=8, no_rope_layers=[1, 0], num_local_experts=2, num_experts_per_tok=1,
                       intermediate_size_mlp=128, interleave_moe_layer_step=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=4, pixel_shuffle_ratio=0.5, projector_input_dim=64, projector_output_dim=64,
                  vision_output_dim=32)
    config = Llama4Config(vision_config=vision, text_config=text, boi_token_index=boi, eoi_token_index=eoi,
                          image_token_index=image)
    model = _seeded(Llama4ForConditionalGeneration)(config)

    def build(with_image):
        layout = Layout()
        if not with_image:
            return text_only(layout)
        layout.text(BEFORE)
        layout.token(boi)
        layout.grid(2, 2, layout.run(image, 4))
        layout.token(x_sep, image=True)
        layout.grid(2, 2, layout.run(image, 4))
        layout.token(y_sep, image=True)
        layout.token(global_img, image=True)
        layout.grid(2, 2, layout.run(image, 4))
        layout.token(eoi)
        layout.text(AFTER)
        return layout.inputs(pixel_values=torch.randn(3, 3, 16, 16, generator=layout.gen)), layout

    return Family("llama4", model, build, hybrid=True)


BUILDERS = {
    "qwen2_5_vl": qwen2_5_vl, "qwen3_vl": qwen3_vl, "qwen3_5": qwen3_5, "gemma3": gemma3, "smolvlm": smolvlm,
    "internvl": internvl, "llava_next": llava_next, "llava_onevision": llava_onevision, "mistral3": mistral3,
    "mistral3_sliding": lambda: mistral3(sliding_window=8), "glm4v": glm4v, "lfm2_vl": lfm2_vl, "llama4": llama4,
}
