"""Training-only pieces of the tiny LLaVA recipe: which cells an answer depends
on, the attention mask built from them, and the LookGuide loss."""

import random

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from elastic.tiny import SHIPPED_MODEL_DIR
from elastic.tiny.data import CELLS, PLURAL, QA_KINDS, ask, evidence_cells, make_scene
from elastic.tiny.train import LookGuide, make_batch, patch_cells


def naive_evidence(scene, question: str) -> list[int]:
    """Independent reference: plain substring tests on the question."""
    if question.startswith("What is in the "):
        return [CELLS.index(question[len("What is in the "):-1])]
    if question.startswith("What colour is the "):
        return [o.cell for o in scene.objects if f" {o.shape}?" in question]
    if question.startswith("How many "):
        noun = question.split()[2]
        return [o.cell for o in scene.objects if noun in ("objects", PLURAL[o.shape])]
    return [o.cell for o in scene.objects if f" {o.colour} {o.shape}" in question]


def test_evidence_cells_match_a_naive_reference():
    rng = random.Random(0)
    seen = set()
    for seed in range(300):
        scene = make_scene(seed)
        for kind in QA_KINDS:
            question, answer = ask(scene, kind, rng)
            got = evidence_cells(scene, question)
            assert got == sorted(naive_evidence(scene, question)), (question, scene)
            seen.add((kind, len(got)))
            if answer == "No." and kind == "exists":
                assert got == []  # an absent object has no cell to look at
    assert {("relation", 2), ("where", 1), ("exists", 0), ("shape_count", 0)} <= seen
    assert evidence_cells(make_scene(1), "Describe the image in detail.") == []


def test_look_mask_marks_answer_positions_and_evidence_image_tokens():
    processor = LlavaProcessor.from_pretrained(SHIPPED_MODEL_DIR)
    batch, _, look = make_batch(processor, random.Random(3), 6, description_rate=0.5, max_questions=3)
    assert look.shape[1] == 1  # one head group, evidence_cells
    look = look[:, 0]
    ids, labels = batch["input_ids"], batch["labels"]
    image = ids == processor.tokenizer.image_token_id
    rows = look.any(-1)
    assert rows.any()
    # Every supervised position predicts an answer token and looks only at image tokens.
    assert (labels[:, 1:][rows[:, :-1]] != -100).all()
    assert not (look & ~image[:, None, :]).any()
    # The marked image tokens of one row are whole grid cells (9 patches each).
    cells = patch_cells()
    for b, t in rows.nonzero().tolist()[::7]:
        marked = look[b, t][image[b]]
        assert marked.sum() % 9 == 0
        assert set(cells[marked].tolist()) <= set(range(9))
        for c in set(cells[marked].tolist()):
            assert marked[cells == c].all()


def test_look_guide_loss_equals_minus_log_attention_mass_of_the_model():
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration.from_pretrained(SHIPPED_MODEL_DIR, attn_implementation="eager")
    processor = LlavaProcessor.from_pretrained(SHIPPED_MODEL_DIR)
    # Two head groups with different targets: the first from evidence_cells, the second
    # only the first evidence cell (so the groups' rows and columns differ).
    first_cell = lambda scene, q: evidence_cells(scene, q)[:1]  # noqa: E731
    batch, _, look = make_batch(processor, random.Random(5), 3, description_rate=0.0, max_questions=2,
                                evidence=(evidence_cells, first_cell))
    layer, groups = 2, [[2, 5], [6]]
    guide = LookGuide(model, layer, groups)
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
        got = guide.loss(look)
    expected = []
    for g, heads in enumerate(groups):
        attn = out.attentions[layer][:, heads]  # (B, h, T, T) from the model's own eager attention
        rows = look[:, g].any(-1)
        mass = (attn * look[:, g, None]).sum(-1).transpose(1, 2)[rows]
        expected.append(-(mass + 1e-6).log().mean())
    assert not torch.equal(look[:, 0], look[:, 1])
    torch.testing.assert_close(got, torch.stack(expected).mean(), rtol=1e-4, atol=1e-5)


def test_look_report_shows_the_shipped_heads_find_objects_and_random_ones_do_not():
    from elastic.tiny.data import VAL_OFFSET
    from elastic.tiny.train import look_report

    processor = LlavaProcessor.from_pretrained(SHIPPED_MODEL_DIR)
    shipped = LlavaForConditionalGeneration.from_pretrained(SHIPPED_MODEL_DIR).eval()
    torch.manual_seed(0)
    untrained = LlavaForConditionalGeneration(shipped.config).eval()
    seeds = range(VAL_OFFSET, VAL_OFFSET + 2)
    trained, chance = look_report(shipped, processor, seeds), look_report(untrained, processor, seeds)
    assert set(trained) == set(chance) and {"where", "relation", "cell"} <= set(trained)
    assert trained["where"] > 0.9 and trained["relation"] > 0.9
    # Untrained attention is spread over ~all 125 positions: one cell (9 tokens) gets little.
    assert chance["where"] < 0.2
