"""Tiny models built from configs (random weights, no downloads) for the tests."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

WORDS = "a the what is in image of colour red green blue shape circle square USER ASSISTANT : ? . , \n".split(" ")
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<image>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}system prompt words .{% for m in messages %}"
    "{% if m['role'] == 'user' %} USER :{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %} <image>{% else %} {{ c['text'] }}{% endif %}{% endfor %}"
    "{% else %} ASSISTANT :{% for c in m['content'] %} {{ c['text'] }}{% endfor %}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %} ASSISTANT :{% endif %}"
)


def llama_config(layers=2, heads=4, kv_heads=2, hidden=64, vocab=64, context=1024):
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=context,
        bos_token_id=2, eos_token_id=3, pad_token_id=1,
    )


def tiny_llama(seed=0, sharpness=1.0, **kw) -> LlamaForCausalLM:
    """A random Llama; ``sharpness`` > 1 scales queries so attention depends on content
    (at init it mostly follows position, so every prompt would pick the same anchors)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(**kw)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(sharpness)
    return model


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIALS + [w for w in WORDS if w])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


QWEN_SPECIALS = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]  # ids 120..123


def tiny_qwen2vl_processor():
    """transformers' Qwen2VLProcessor without its video processor (``elastic.processors``, no
    torchvision) over a word tokenizer (ids as tiny_qwen2vl)."""
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

    from elastic.processors import without_video

    vocab = {w: i for i, w in enumerate(SPECIALS + [w for w in WORDS if w])}
    vocab.update({w: 120 + i for i, w in enumerate(QWEN_SPECIALS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS})
    template = CHAT_TEMPLATE.replace(" <image>", " <|vision_start|><|image_pad|><|vision_end|>")
    images = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16,
                                      max_pixels=32 * 32)
    return without_video(Qwen2VLProcessor)(images, fast, chat_template=template)


def tiny_llava(seed=0, image_size=32, patch=8, layers=2):
    """A random LLaVA (CLIP tower + Llama) and its processor: (image_size/patch)^2 image tokens."""
    torch.manual_seed(seed)
    tokenizer = word_tokenizer()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=image_size, patch_size=patch)
    config = LlavaConfig(vision_config=vision, text_config=llama_config(layers=layers, vocab=len(tokenizer)),
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    return model, processor


def tiny_qwen2vl(seed=0, layers=2):
    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2, in_channels=3),
        image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123,
    )
    config.text_config.bos_token_id, config.text_config.eos_token_id, config.text_config.pad_token_id = 2, 3, 1
    return Qwen2VLForConditionalGeneration(config).eval()


def qwen2vl_inputs(batch=1, grid=(4, 4), text_before=6, text_after=10, seed=1):
    """Hand-built Qwen2-VL inputs (no processor): one image of ``grid`` merged patches."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = grid
    n_img = rows * cols
    ids = []
    for _ in range(batch):
        before = torch.randint(3, 100, (text_before,), generator=g)
        after = torch.randint(3, 100, (text_after,), generator=g)
        ids.append(torch.cat([before, torch.tensor([122]), torch.full((n_img,), 120), torch.tensor([123]), after]))
    input_ids = torch.stack(ids)
    patches = rows * 2 * cols * 2  # before the 2x2 merge
    pixel_values = torch.randn(batch * patches, 3 * 2 * 4 * 4, generator=g)
    image_grid_thw = torch.tensor([[1, rows * 2, cols * 2]] * batch)
    mm = (input_ids == 120).long()
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values,
            "image_grid_thw": image_grid_thw, "mm_token_type_ids": mm}
