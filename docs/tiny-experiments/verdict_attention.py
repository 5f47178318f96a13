"""Where the model looks when it writes a relation's verdict (needs short-answers.patch).

    ./run.sh python docs/tiny-experiments/verdict_attention.py MODEL_DIR

For one relation per validation scene 1,000,000-1,000,039 (``random.Random(3 * seed + 1)``),
the reference answer is teacher-forced; at the position that predicts " yes"/" no" the
script prints, per layer and head, the mean attention mass on the question's relation
words ("left of", "above", ...) / the first clause's cell name / the second clause's.
"""

import random
import re
import sys
from collections import defaultdict

import torch

from elastic.tiny import load
from elastic.tiny.data import VAL_OFFSET, ask, chat_messages, make_scene, render
from elastic.tiny.train import NUM_IMAGE_TOKENS, answer_char_tokens, encode_chat

torch.set_num_threads(2)
model, processor = load(sys.argv[1])
model.set_attn_implementation("eager")
tokenizer = processor.tokenizer
mass, n = defaultdict(float), 0
for seed in range(VAL_OFFSET, VAL_OFFSET + 40):
    scene = make_scene(seed)
    question, answer = ask(scene, "relation", random.Random(3 * seed + 1))
    turns = [(question, answer)]
    ids, _, _ = encode_chat(tokenizer, turns)
    owner = answer_char_tokens(tokenizer, turns)[0]
    prompt = processor.apply_chat_template(chat_messages([(question, "")], add_answer_last=False),
                                           add_generation_prompt=True).replace("<image>", "<image>" * NUM_IMAGE_TOKENS)
    at, word = prompt.index(question), re.search(r"left of|right of|above|below", question)
    offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    targets = {
        "relation word": {t for t, (x, y) in enumerate(offsets) if x < at + word.end() and y > at + word.start()},
        "cell 1": {owner[i] for i in range(answer.index(" is in the ") + 11, answer.index(" and the "))},
        "cell 2": {owner[i] for i in range(answer.index(" is in the ", answer.index(" and the ")) + 11,
                                           answer.rindex(", so "))},
    }
    verdict = owner[answer.rindex(" ") + 1] - 1  # the position that predicts " yes" / " no"
    pixels = processor.image_processor([render(scene)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        attentions = model(input_ids=torch.tensor([ids]), pixel_values=pixels, output_attentions=True).attentions
    for layer, attn in enumerate(attentions):
        for name, tokens in targets.items():
            for head, m in enumerate(attn[0, :, verdict, sorted(tokens)].sum(-1).tolist()):
                mass[layer, head, name] += m
    n += 1
print("layer  head: relation word / cell 1 / cell 2 (mean attention mass at the verdict position)")
for layer in range(len(attentions)):
    print(layer, " ".join(f"h{h}:" + "/".join(f"{mass[layer, h, k] / n:.2f}" for k in targets)
                          for h in range(attentions[0].shape[1])))
