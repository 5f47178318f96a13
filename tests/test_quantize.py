"""Weight-only int8 (``load_model(quantize="int8")``): the layer against a naive per-row
quantisation, the model against its own float32 logits, and the shipped model still
reading a validation scene."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_llava

import elastic
from elastic.quantize import Int8Linear, quantize_int8
from elastic.tiny.data import DESCRIBE_PROMPT, VAL_OFFSET, describe, make_scene, render
from elastic.tiny.evaluate import all_objects_right, generate


def naive_int8(weight: torch.Tensor) -> torch.Tensor:
    """Row by row: scale the largest |entry| to 127, round, scale back."""
    rows = []
    for row in weight.tolist():
        scale = max(abs(v) for v in row) / 127
        rows.append([round(v / scale) * scale for v in row])
    return torch.tensor(rows)


def test_int8_linear_multiplies_by_the_rounded_weights():
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 40)
    x = torch.randn(3, 5, 48)
    layer = Int8Linear.from_linear(linear)
    reference = x @ naive_int8(linear.weight).T + linear.bias
    out = layer(x)
    assert out.shape == (3, 5, 40) and out.dtype == torch.float32
    # bfloat16 activations and scales: about 3 significant digits
    assert torch.allclose(out, reference, rtol=2e-2, atol=2e-2)
    assert torch.allclose(layer.dequantized_weight(), naive_int8(linear.weight), rtol=1e-2, atol=1e-4)
    # and it is a real approximation of the float layer, not of some other one
    assert (out - linear(x)).abs().max() < 0.05 * linear(x).abs().max()
    assert (out - torch.nn.Linear(48, 40)(x)).abs().max() > 0.1


def test_quantize_replaces_the_language_models_linears_and_keeps_its_logits():
    model, processor = tiny_llava(layers=2)
    vision_before = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    ids = torch.randint(5, 20, (1, 12))  # words, no <image>
    with torch.no_grad():
        before = model(input_ids=ids).logits
        replaced = quantize_int8(model)
        after = model(input_ids=ids).logits
    assert replaced == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the LM head
    assert isinstance(model.get_output_embeddings(), Int8Linear)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.model.language_model.modules())
    assert all(torch.equal(v, vision_before[k]) for k, v in model.model.vision_tower.state_dict().items())
    assert torch.nn.functional.cosine_similarity(before.flatten(), after.flatten(), dim=0) > 0.999
    assert (before.argmax(-1) == after.argmax(-1)).float().mean() > 0.9


def test_quantize_is_checked():
    with pytest.raises(ValueError, match="quantize must be one of int8"):
        elastic.load_model("tiny-llava", device="cpu", quantize="int4")
    with pytest.raises(ValueError, match="for decoding on a CPU"):
        elastic.load_model("tiny-llava", device="cuda", quantize="int8")


def test_the_shipped_model_in_int8_still_describes_a_validation_scene():
    torch.set_num_threads(2)
    model, processor = elastic.load_model(device="cpu", quantize="int8")
    scene = make_scene(VAL_OFFSET + 1)
    text = generate(model, processor, render(scene), DESCRIBE_PROMPT)
    assert all_objects_right(scene, text), (text, describe(scene))
    gen = elastic.generate(model, processor, render(scene), DESCRIBE_PROMPT, method="elastic", budget=0.5,
                           max_new_tokens=8)
    assert gen.stats["new_tokens"] == 8 and gen.trace.layers  # the policies run on the int8 model
