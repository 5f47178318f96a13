"""elastic.generate and elastic.load_model on tiny models, against direct transformers calls."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import DynamicCache

import elastic
from tiny import tiny_llava, tiny_qwen2vl, tiny_qwen2vl_processor


@pytest.fixture(scope="module")
def llava():
    model, processor = tiny_llava()
    return elastic.attach(model), processor


def direct_answer(model, processor, image, question, n):
    """Reference: the processor and model.generate with a stock DynamicCache."""
    text = processor.apply_chat_template([elastic.user_message(question, True)], add_generation_prompt=True,
                                         tokenize=False)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, cache=DynamicCache(), max_new_tokens=n, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip(), inputs


def test_generate_full_budget_matches_direct_generate(llava):
    model, processor = llava
    image = Image.new("RGB", (50, 40), (200, 30, 30))
    expected, inputs = direct_answer(model, processor, image, "what is the colour ?", 8)
    for method in elastic.METHODS:
        result = elastic.generate(model, processor, image, "what is the colour ?", method=method, budget=1.0,
                                  max_new_tokens=8)
        assert result.text == expected
    ids = inputs["input_ids"][0]
    image_positions = (ids == model.config.image_token_id).nonzero().flatten().tolist()
    trace = result.trace
    assert trace.spans["image"] == (image_positions[0], image_positions[-1] + 1)
    assert trace.spans["system"] == (0, image_positions[0])
    assert trace.spans["instruction"] == (image_positions[-1] + 1, len(ids))
    assert trace.image_grid == (4, 4) and len(image_positions) == 16
    assert trace.tokens[: len(ids)] == [processor.tokenizer.decode([i]) for i in ids.tolist()]
    stats = result.stats
    assert stats["prompt_tokens"] == len(ids) and stats["new_tokens"] >= 1
    assert stats["full_kv_bytes"] == stats["kv_bytes"]  # budget 1.0 keeps everything


def test_generate_compresses_and_reports_bytes(llava):
    model, processor = llava
    result = elastic.generate(model, processor, Image.new("RGB", (32, 32)), "what shape ?", method="elastic",
                              budget=0.4, max_new_tokens=6)
    trace = result.trace
    assert result.stats["kv_bytes"] == trace.lengths[-1] * trace.bytes_per_entry
    assert result.stats["kv_bytes"] < result.stats["full_kv_bytes"]


def test_chat_history_and_image_path(llava, tmp_path):
    model, processor = llava
    path = tmp_path / "scene.png"
    Image.new("RGB", (64, 48), "green").save(path)
    messages = [elastic.user_message("what is the colour ?", True),
                {"role": "assistant", "content": [{"type": "text", "text": "green ."}]},
                elastic.user_message("what shape ?", False)]
    result = elastic.generate(model, processor, str(path), messages, method="h2o", budget=0.5, max_new_tokens=4)
    assert result.trace.prompt_length > len(processor.tokenizer("USER : what shape ?")["input_ids"]) + 16
    # Earlier turns are "history"; the instruction is the last user turn plus the generation prompt.
    tokens, spans = result.trace.tokens, result.trace.spans
    last = [t.strip() for t in tokens[slice(*spans["instruction"])]]
    assert last == "USER : what shape ? ASSISTANT :".split()
    assert [t.strip() for t in tokens[slice(*spans["history"])]] == "what is the colour ? ASSISTANT : green . </s>".split()
    assert spans["image"][1] == spans["history"][0] and spans["history"][1] == spans["instruction"][0]


def test_protect_instruction_keeps_the_last_turn_unmerged(llava):
    model, processor = llava
    messages = [elastic.user_message("what is the colour ?", True),
                {"role": "assistant", "content": [{"type": "text", "text": "green ."}]},
                elastic.user_message("what shape is in the image ?", False)]
    result = elastic.generate(model, processor, Image.new("RGB", (32, 32), "red"), messages, method="elastic",
                              budget=0.5, protect="instruction", max_new_tokens=3)
    trace = result.trace
    start, end = trace.spans["instruction"]
    assert set(range(start, end)) <= set(trace.protected.tolist())
    for layer in trace.layers:  # kept as themselves, and nothing else folded into them
        assert set(range(start, end)) <= set(layer.kept.tolist())
        assert all(layer.group_sizes()[p] == 1 for p in range(start, end))
    assert trace.options["protect"] == "instruction"


def test_bad_input_is_refused_clearly(llava, tmp_path):
    model, processor = llava
    image = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match="empty"):
        elastic.generate(model, processor, image, "   ")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="not a readable image"):
        elastic.generate(model, processor, str(broken), "what ?")
    with pytest.raises(ValueError, match="context"):
        elastic.generate(model, processor, image, "what " * 1100, max_new_tokens=4)
    with pytest.raises(ValueError, match="budget"):
        elastic.generate(model, processor, image, "what ?", budget=0.0)
    huge = Image.new("RGB", (5000, 300))
    assert max(elastic.load_image(huge).size) == elastic.generation.MAX_IMAGE_SIDE


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 2.5, "abc", None, 0, True])
def test_max_new_tokens_must_be_a_whole_number(llava, bad):
    model, processor = llava
    with pytest.raises(ValueError, match="max_new_tokens"):
        elastic.generate(model, processor, Image.new("RGB", (32, 32)), "what ?", max_new_tokens=bad)


def test_text_that_cannot_fit_is_refused_before_tokenising(llava, monkeypatch):
    model, processor = llava
    tokenizer = processor.tokenizer
    longest = elastic.generation.longest_token(tokenizer)
    assert longest == max(len(tokenizer.convert_tokens_to_string([t])) for t in tokenizer.get_vocab())
    limit = elastic.generation.context_length(model)
    calls = []
    monkeypatch.setattr(elastic.generation, "build_inputs", lambda *a, **k: calls.append(1) / 0)
    import time

    start = time.perf_counter()
    with pytest.raises(ValueError, match="characters"):
        elastic.generate(model, processor, None, "x" * 20_000_000)
    assert time.perf_counter() - start < 1.0 and not calls  # refused without tokenising
    just_over = [elastic.user_message("x" * (limit * longest + 1), with_image=False)]
    with pytest.raises(ValueError, match="characters"):
        elastic.generation.check_length(just_over, tokenizer, limit)
    elastic.generation.check_length([elastic.user_message("x" * (limit * longest), with_image=False)],
                                    tokenizer, limit)  # may fit: left to the token count


def test_tiny_budget_warns_and_keeps_minimum(llava):
    model, processor = llava
    result = elastic.generate(model, processor, Image.new("RGB", (32, 32)), "what ?", method="elastic",
                              budget=0.01, max_new_tokens=3)
    assert result.warnings and "protected" in result.warnings[0]
    assert result.trace.lengths[0] == 3  # one sink, the last prompt token and one anchor


def test_unattached_model_refused():
    model, processor = tiny_llava()
    with pytest.raises(RuntimeError, match="attach"):
        elastic.generate(model, processor, Image.new("RGB", (32, 32)), "what ?")


def test_qwen2vl_generate_spans_and_grid():
    model = elastic.attach(tiny_qwen2vl())
    processor = tiny_qwen2vl_processor()
    image = Image.new("RGB", (40, 30), "red")
    result = elastic.generate(model, processor, image, "what is the colour ?", budget=1.0, max_new_tokens=5)
    inputs = processor(text=processor.apply_chat_template([elastic.user_message("what is the colour ?", True)],
                                                          add_generation_prompt=True, tokenize=False), images=[image],
                       return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, cache=DynamicCache(), max_new_tokens=5, do_sample=False)
    assert result.text == processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    rows, cols = (int(x) // 2 for x in inputs["image_grid_thw"][0, 1:])
    start, end = result.trace.spans["image"]
    assert result.trace.image_grid == (rows, cols) and end - start == rows * cols
    assert int(inputs["mm_token_type_ids"].sum()) == rows * cols


def test_load_model_from_saved_directory(llava, tmp_path):
    model, processor = llava
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = elastic.load_model(tmp_path, device="cpu")
    assert elastic.is_attached(loaded)
    image = Image.new("RGB", (32, 32), "blue")
    a = elastic.generate(loaded, loaded_processor, image, "what ?", budget=0.5, max_new_tokens=5)
    b = elastic.generate(model, processor, image, "what ?", budget=0.5, max_new_tokens=5)
    assert a.text == b.text


@pytest.mark.parametrize("placement", ["auto", "split"])
def test_load_model_with_a_device_map(llava, tmp_path, placement):
    """How a GPU host loads (``device_map``, through accelerate), simulated on CPU: "auto",
    and an explicit map that offloads one language-model layer to disk, so generation runs
    across two devices with accelerate's hooks around elastic's attention."""
    model, processor = llava
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    device_map = "auto" if placement == "auto" else {
        "model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", "lm_head": "cpu",
        **{f"model.language_model.{n}": "cpu" for n, _ in model.model.language_model.named_children()
           if n != "layers"},
        "model.language_model.layers.0": "cpu", "model.language_model.layers.1": "disk"}
    loaded, loaded_processor = elastic.load_model(tmp_path / "model", device="cpu", device_map=device_map,
                                                  offload_folder=tmp_path / "offload")
    if placement == "split":
        assert set(loaded.hf_device_map.values()) == {"cpu", "disk"}
        offloaded = next(loaded.model.language_model.layers[1].parameters())
        assert offloaded.device.type == "meta"  # its weights come in through accelerate's hook
    image = Image.new("RGB", (32, 32), "blue")
    for method in ("elastic", "h2o"):
        a = elastic.generate(loaded, loaded_processor, image, "what ?", method=method, budget=0.5, max_new_tokens=6)
        b = elastic.generate(model, processor, image, "what ?", method=method, budget=0.5, max_new_tokens=6)
        assert a.text == b.text and a.trace.layers[1].kept.tolist() == b.trace.layers[1].kept.tolist()


def test_load_model_failure_is_one_clear_error(tmp_path):
    with pytest.raises(elastic.ModelLoadError, match="could not load model"):
        elastic.load_model(tmp_path / "missing", device="cpu")
