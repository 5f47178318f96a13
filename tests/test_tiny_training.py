"""Training-only pieces of the tiny LLaVA recipe: which cells an answer depends
on, the attention mask built from them, and the LookGuide loss."""

import random
import re

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from elastic.tiny import SHIPPED_MODEL_DIR
from elastic.tiny.data import (CELLS, DESCRIBE_PROMPT, NUMBERS, PLURAL, QA_KINDS, ask, conversation, describe,
                               evidence_cells, evidence_spans, make_scene, TEXT_EVIDENCE)
from elastic.tiny.train import LookGuide, char_tokens, encode_chat, make_batch, mark_copies, mark_evidence, patch_cells


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
    assert {("relation", 2), ("where", 1), ("exists", 0), ("shape_count", 0), ("shape_count", 2)} <= seen
    assert evidence_cells(make_scene(1), "Describe the image in detail.") == []


def test_look_mask_marks_answer_positions_and_evidence_image_tokens():
    processor = LlavaProcessor.from_pretrained(SHIPPED_MODEL_DIR)
    batch, _, look = make_batch(processor, random.Random(3), 6, description_rate=0.5, max_questions=3)
    assert look.shape[1] == 1 + len(TEXT_EVIDENCE)  # the image evidence, then the words read at the verdict
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
    # Two head groups with different targets: the first from evidence_spans, the second
    # only the first evidence cell (so the groups' rows and columns differ).
    first_cell = lambda scene, q, a: [(0, len(a), evidence_cells(scene, q)[:1])] if evidence_cells(scene, q) else []  # noqa: E731
    batch, _, look = make_batch(processor, random.Random(5), 3, description_rate=0.0, max_questions=2,
                                evidence=(evidence_spans, first_cell), copies=())
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


def _relation_objects(scene, question: str):
    m = re.fullmatch(r"Is the (\w+ \w+) (?:left of|right of|above|below) the (\w+ \w+)\?", question)
    by_name = {o.name: o for o in scene.objects}
    return by_name[m[1]], by_name[m[2]]


def test_relation_clauses_look_at_their_own_object_and_the_verdict_is_true():
    rng = random.Random(3)
    seen = set()
    for seed in range(200):
        scene = make_scene(seed)
        question, answer = ask(scene, "relation", rng)
        a, b = _relation_objects(scene, question)
        word = re.search(r"left of|right of|above|below", question)[0]
        first, second = evidence_spans(scene, question, answer)
        assert (first[0], first[1]) == (0, second[0]) and answer[second[1]:].startswith(": ")
        axis, ca, cb = ("column", a.col, b.col) if "of" in word else ("row", a.row, b.row)
        assert answer[:first[1]] == f"The {a.name} is in {axis} {NUMBERS[ca + 1]}"
        assert answer[second[0]:second[1]] == f" and the {b.name} is in {axis} {NUMBERS[cb + 1]}"
        assert first[2] == [a.cell] and second[2] == [b.cell]
        # Naive reference for the verdict: compare the objects' grid coordinates.
        truth = {"left of": a.col < b.col, "right of": a.col > b.col, "above": a.row < b.row,
                 "below": a.row > b.row}[word]
        assert answer[second[1]:] == f": {NUMBERS[ca + 1]} {word} {NUMBERS[cb + 1]}, {'yes' if truth else 'no'}."
        seen.add((word, truth))
    assert len(seen) == 8  # every relation word, both verdicts


def test_shape_count_clauses_look_at_each_match_in_reading_order():
    rng = random.Random(4)
    seen = set()
    for seed in range(300):
        scene = make_scene(seed)
        question, answer = ask(scene, "shape_count", rng)
        noun = question.split()[2]
        matches = [o for o in scene.objects if PLURAL[o.shape] == noun]
        spans = evidence_spans(scene, question, answer)
        seen.add(len(matches))
        if not matches:
            assert answer == f"There are no {noun}." and spans == []
            continue
        assert answer.endswith(f", so there {'is' if len(matches) == 1 else 'are'} "
                               f"{NUMBERS[len(matches)]} {noun if len(matches) > 1 else matches[0].shape}.")
        assert [cells for _, _, cells in spans] == [[o.cell] for o in matches]
        for k, ((start, end, _), o) in enumerate(zip(spans, matches)):
            clause = answer[start:end].lstrip(", ")
            assert clause.lower() == f"{o.shape} {NUMBERS[k + 1]} is in the {CELLS[o.cell]}"
            assert start == 0 or answer[start] == ","  # the decision to go on is guided too
        assert answer[spans[-1][1]:].startswith(", so ")
    assert {0, 1, 2} <= seen


def test_char_tokens_point_at_the_tokens_holding_each_character():
    processor = LlavaProcessor.from_pretrained(SHIPPED_MODEL_DIR)
    tokenizer = processor.tokenizer
    rng = random.Random(6)
    for seed in range(8):
        turns = conversation(make_scene(seed), rng, description_rate=0.6, max_questions=3)
        ids, _, spans = encode_chat(tokenizer, turns)
        for (question, answer), (start, end), (q_owner, owner) in zip(turns, spans, char_tokens(tokenizer, turns)):
            assert len(q_owner) == len(question) and q_owner == sorted(q_owner) and q_owner[-1] < start
            for c, t in zip(question, q_owner):
                assert c in tokenizer.decode([ids[t]]), (c, tokenizer.decode([ids[t]]))
            assert len(owner) == len(answer) and owner == sorted(owner)
            # The answer starts at its span (after a lone-space token, if the BPE split one
            # off) and its last character sits just before </s>.
            assert owner[0] == start or (owner[0] == start + 1 and tokenizer.decode([ids[start]]) == " ")
            assert owner[-1] == end - 2 and ids[end - 1] == tokenizer.eos_token_id
            for c, t in zip(answer, owner):  # decoding a character's token shows that character
                assert c in tokenizer.decode([ids[t]]), (c, tokenizer.decode([ids[t]]))


def test_look_mask_follows_the_clauses_of_a_relation():
    processor = LlavaProcessor.from_pretrained(SHIPPED_MODEL_DIR)
    tokenizer = processor.tokenizer
    cells = patch_cells()
    rng = random.Random(12)
    for seed in range(5):
        scene = make_scene(seed)
        turns = [ask(scene, "relation", rng)]
        a, b = _relation_objects(scene, turns[0][0])
        ids, _, spans = encode_chat(tokenizer, turns)
        look = torch.zeros(len(ids), len(ids), dtype=torch.bool)
        mark_evidence(look, ids, turns, spans, char_tokens(tokenizer, turns), scene,
                      tokenizer.image_token_id)
        image = torch.tensor(ids) == tokenizer.image_token_id
        start, end = spans[0]
        rows = look.any(-1).nonzero().flatten().tolist()
        tail = len(tokenizer(": " + turns[0][1].split(": ")[1]).input_ids)  # the unguided comparison
        assert rows[0] in (start - 1, start) and rows == list(range(rows[0], rows[-1] + 1))
        assert abs((end - 1 - rows[-1]) - tail) <= 1
        for t in rows:  # naive reference: what has been written, up to the predicted token
            written = tokenizer.decode(ids[start:t + 2])
            expected = {b.cell} if " and" in written else {a.cell}
            assert set(cells[look[t][image]].tolist()) == expected, written


def test_look_mask_follows_the_object_sentences_of_a_description():
    processor = LlavaProcessor.from_pretrained(SHIPPED_MODEL_DIR)
    tokenizer = processor.tokenizer
    cells = patch_cells()
    for seed in range(6):
        scene = make_scene(seed)
        turns = [(DESCRIBE_PROMPT, describe(scene))]
        ids, _, spans = encode_chat(tokenizer, turns)
        look = torch.zeros(len(ids), len(ids), dtype=torch.bool)
        mark_evidence(look, ids, turns, spans, char_tokens(tokenizer, turns), scene, tokenizer.image_token_id)
        image = torch.tensor(ids) == tokenizer.image_token_id
        start, end = spans[0]
        guided = 0
        for t in range(start - 1, end - 1):
            # Naive reference: decode what has been written up to the predicted token; the
            # sentence it is in is guided iff it is an object sentence ("In the ..."), and
            # the k-th such sentence belongs to the k-th object in reading order.
            written = tokenizer.decode(ids[start:t + 2])
            done, _, current = (written[:-1] if written.endswith(".") else written).rpartition(".")
            if current.strip().startswith("In"):
                k = written.count(". In")
                assert set(cells[look[t][image]].tolist()) == {scene.objects[k - 1].cell}, written
                guided += 1
            else:
                assert not look[t].any(), written
        assert guided >= 9 * len(scene.objects)  # every object sentence is at least 9 tokens


def test_copy_mask_points_the_comparison_word_and_verdict_at_the_question_word():
    processor = LlavaProcessor.from_pretrained(SHIPPED_MODEL_DIR)
    tokenizer = processor.tokenizer
    rng = random.Random(7)
    for seed in range(8):
        scene = make_scene(seed)
        turns = [ask(scene, "relation", rng)]
        question, answer = turns[0]
        word = re.search(r"left of|right of|above|below", question)[0]
        ids, _, spans = encode_chat(tokenizer, turns)
        look = torch.zeros(len(ids), len(ids), dtype=torch.bool)
        mark_copies(look, turns, char_tokens(tokenizer, turns), TEXT_EVIDENCE[0])
        start, end = spans[0]
        rows = look.any(-1).nonzero().flatten().tolist()
        # Naive reference from decoded text: the rows predict the comparison's relation word
        # and the verdict, after the ": "; every row looks at the question's relation word.
        predicted = "".join(tokenizer.decode([ids[t + 1]]) for t in rows)
        assert predicted.split() == word.split() + [answer.rsplit(", ", 1)[1].rstrip(".")], predicted
        assert ": " in tokenizer.decode(ids[start:rows[0] + 1])
        for t in rows:
            columns = look[t].nonzero().flatten().tolist()
            assert columns[-1] < start and "".join(tokenizer.decode([ids[k]]) for k in columns).split() == word.split()
