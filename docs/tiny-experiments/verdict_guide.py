"""Fine-tune with a verdict guide: heads 4-5 of layer 2, while a relation's verdict
(", so yes.") is written, are trained to look at the question's relation word and the
two cell names just written (heads 2-3 keep the image guide). Relation-heavy chats as in
relation_heavy.py. Needs short-answers.patch.

    ./run.sh python docs/tiny-experiments/verdict_guide.py --init /tmp/short --vision-steps 0 \
        --steps 600 --warmup 50 --lr 3e-4 --eval-n 0 --out /tmp/verdict_ft
    ./run.sh python -m elastic.tiny.evaluate --model /tmp/verdict_ft --seed 0 --n 200
"""
import re
import sys

import torch

from elastic.tiny import data, train
from elastic.tiny.data import VAL_OFFSET, chat_messages, conversation, evidence_spans, make_scene, render
from elastic.tiny.train import _render, answer_char_tokens, encode_chat, mark_evidence, patch_labels

data.QA_KINDS = data.QA_KINDS + ["relation"] * 4
RELATION = re.compile(r"left of|right of|above|below")


def mark_verdict(look, tokenizer, turns, spans):
    """Rows: the positions predicting a relation's ", so yes." / ", so no."; columns: the
    question's relation-word tokens and the two cell names of the answer's clauses."""
    text = _render(tokenizer, chat_messages(turns), False)
    offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    owners = answer_char_tokens(tokenizer, turns)
    searched = 0
    for k, ((question, answer), (_, end), owner) in enumerate(zip(turns, spans, owners)):
        q_at = text.index(question, searched)
        searched = q_at + len(question)
        if ", so " not in answer:
            continue
        word = RELATION.search(question)
        cols = {t for t, (x, y) in enumerate(offsets) if x < q_at + word.end() and y > q_at + word.start()}
        second, verdict = answer.index(" and the "), answer.rindex(", so ")
        cols |= {owner[i] for i in range(answer.index(" is in the ") + 11, second)}
        cols |= {owner[i] for i in range(answer.index(" is in the ", second) + 11, verdict)}
        look[owner[verdict] - 1:end - 1, sorted(cols)] = True


def make_batch(processor, rng, batch_size, description_rate=0.8, max_questions=3):
    """``train.make_batch`` with two look groups: the image evidence, then the verdict."""
    tokenizer = processor.tokenizer
    scenes = [make_scene(rng.randrange(VAL_OFFSET)) for _ in range(batch_size)]
    chats = [conversation(s, rng, description_rate, max_questions) for s in scenes]
    encoded = [encode_chat(tokenizer, turns) for turns in chats]
    width = max(len(ids) for ids, _, _ in encoded)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _, _ in encoded])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab, _ in encoded])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _, _ in encoded])
    pixels = processor.image_processor([render(s) for s in scenes], return_tensors="pt")["pixel_values"]
    patch = torch.stack([patch_labels(s) for s in scenes])
    look = torch.zeros(batch_size, 2, width, width, dtype=torch.bool)
    for b, (scene, turns, (ids, _, spans)) in enumerate(zip(scenes, chats, encoded)):
        mark_evidence(look[b, 0], ids, turns, spans, answer_char_tokens(tokenizer, turns), scene,
                      tokenizer.image_token_id, evidence_spans)
        mark_verdict(look[b, 1], tokenizer, turns, spans)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}, patch, look


if __name__ == "__main__":
    train.make_batch = make_batch
    train.main(sys.argv[1:] + ["--look-heads", "2,3", "4,5"])
