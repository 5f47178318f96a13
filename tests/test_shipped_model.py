"""The shipped default model (SmolLM2 with eyes): it loads offline through ``load_model()``,
reads a validation scene it never saw, and the app's four examples get right answers.

The references are the scenes themselves (``elastic.tiny.data``), not recorded outputs; a
negative control (the projector's weights randomised) shows the checks can fail.
"""

from __future__ import annotations

import json

import pytest
import torch

import elastic
from elastic.tiny.data import DESCRIBE_PROMPT, VAL_OFFSET, describe, make_scene, render
from elastic.tiny.evaluate import all_objects_right, answer_right, generate

ROOT = elastic.SHIPPED_MODEL.parent.parent
SCENE = make_scene(VAL_OFFSET + 1)  # a validation scene: never trained on


@pytest.fixture(scope="module")
def default():
    torch.set_num_threads(2)
    return elastic.load_model(device="cpu")


def test_the_default_is_smollm2_with_eyes(default):
    model, processor = default
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.text_config.num_hidden_layers == 30
    assert processor.tokenizer.convert_ids_to_tokens(model.config.image_token_id) == "<image>"


def test_default_model_describes_a_validation_scene(default):
    model, processor = default
    text = generate(model, processor, render(SCENE), DESCRIBE_PROMPT)
    assert all_objects_right(SCENE, text), (text, describe(SCENE))
    # negative control: the same model with a random projector does not see the scene
    projector = model.model.multi_modal_projector
    saved = {k: v.clone() for k, v in projector.state_dict().items()}
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            for p in projector.parameters():
                p.normal_(0, 0.02)
        blind = generate(model, processor, render(SCENE), DESCRIBE_PROMPT)
    finally:
        projector.load_state_dict(saved)
    assert not all_objects_right(SCENE, blind), blind


def test_the_apps_examples_are_answered_right_with_the_full_cache(default):
    model, processor = default
    examples = json.loads((ROOT / "assets" / "examples" / "examples.json").read_text())
    assert len(examples) == 4
    for example in {(e["image"], e["prompt"]): e for e in examples}.values():  # two share a question
        scene = make_scene(example["seed"])
        image = elastic.load_image(str(ROOT / "assets" / "examples" / example["image"]))
        answer = generate(model, processor, image, example["prompt"])
        if example["prompt"] == DESCRIBE_PROMPT:
            assert example["reference"] == describe(scene)
            assert all_objects_right(scene, answer), (example["image"], answer)
        else:
            assert answer == example["reference"], (example["image"], answer)


def test_each_example_says_whether_elastic_at_its_budget_answers_right(default):
    """``elastic_right`` in examples.json (the app's captions state it): Elastic Cache at the
    example's own ``budget`` (what choosing the example sets), with the app's other first
    settings, answers right, or it does not. The first example is one it gets right, and its
    budget is the app's first budget."""
    from app import DEFAULT_BUDGET, DEFAULT_MAX_NEW_TOKENS, DEFAULT_METHOD

    model, processor = default
    examples = json.loads((ROOT / "assets" / "examples" / "examples.json").read_text())
    assert examples[0]["elastic_right"] is True and examples[0]["budget"] == DEFAULT_BUDGET
    assert any(example["elastic_right"] is False for example in examples)  # and one where it breaks
    for example in examples:
        image = elastic.load_image(str(ROOT / "assets" / "examples" / example["image"]))
        answer = elastic.generate(model, processor, image, example["prompt"], method=DEFAULT_METHOD,
                                  budget=example["budget"], max_new_tokens=DEFAULT_MAX_NEW_TOKENS).text
        right = answer_right(make_scene(example["seed"]), example["prompt"], example["reference"], answer)
        assert right == example["elastic_right"], (example["image"], example["budget"], answer)


def test_default_elastic_on_the_shipped_model_is_the_papers_method(default):
    """On the real 30-layer model, the library's default Elastic Cache makes the decisions of
    the naive loop implementation of the paper's rules (eager attention maps), token for token."""
    from naive import run

    model, processor = default
    inputs, _ = elastic.build_inputs(model, processor, [elastic.user_message(DESCRIBE_PROMPT, True)],
                                     render(SCENE))
    T, n = inputs["input_ids"].shape[1], 6
    cache = elastic.make_cache("elastic", budget=0.5)
    with torch.no_grad():
        out = model.generate(**inputs, cache=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    tokens, ref = run(model, inputs["input_ids"], "elastic", 0.5, n,
                      prefill_inputs={"pixel_values": inputs["pixel_values"]})
    assert out[0, T:].tolist() == tokens
    for layer, kept, group in zip(cache.trace.layers, ref["kept"], ref["group"], strict=True):
        assert layer.kept.tolist() == kept and layer.group.tolist() == group
    assert cache.trace.lengths == ref["lengths"]
