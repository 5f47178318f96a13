"""Failure breakdowns quoted in docs/tiny-model.md (run with the patch of the model applied).

    ./run.sh python docs/tiny-experiments/breakdown.py MODEL_DIR clauses   # 60 scenes
    ./run.sh python docs/tiny-experiments/breakdown.py MODEL_DIR verdicts  # 80 scenes
    ./run.sh python docs/tiny-experiments/breakdown.py MODEL_DIR restated  # 60 scenes, reasoned-answers.patch

``clauses``: per reasoned kind (cell, relation, shape_count) on validation scenes
1,000,000-1,000,059, one question each (``random.Random(seed)``): right or wrong, and
for relations whether the text before ", so" (the two clauses) was right.
``verdicts``: one relation per scene (``random.Random(3 * seed + 1)``), counted by
relation word, true verdict and answered verdict.
``restated`` (reasoned answers): like ``clauses``, but whether the short answer after
" So " restates the question's cell / objects / shape, and whether the description
before it is the reference word for word.
"""

import random
import re
import sys
from collections import Counter

import torch

from elastic.tiny import load
from elastic.tiny.data import VAL_OFFSET, ask, describe, make_scene, render
from elastic.tiny.evaluate import generate

torch.set_num_threads(2)
model, processor = load(sys.argv[1])
counts = Counter()
if sys.argv[2] == "clauses":
    for seed in range(VAL_OFFSET, VAL_OFFSET + 60):
        scene, rng = make_scene(seed), random.Random(seed)
        image = render(scene)
        for kind in ("relation", "cell", "shape_count"):
            question, answer = ask(scene, kind, rng)
            pred = generate(model, processor, image, question, max_new_tokens=48)
            if kind == "relation":
                clauses = "clauses right" if pred.rsplit(", so", 1)[0] == answer.rsplit(", so", 1)[0] else "clauses wrong"
            else:
                clauses = "empty cell" if answer.endswith("is empty.") else ""
            counts[kind, clauses, "right" if pred == answer else "wrong"] += 1
elif sys.argv[2] == "restated":
    from elastic.tiny.data import final_answer  # only in reasoned-answers.patch

    for seed in range(VAL_OFFSET, VAL_OFFSET + 60):
        scene, rng = make_scene(seed), random.Random(seed)
        image = render(scene)
        for kind in ("cell", "relation", "shape_count"):
            question, answer = ask(scene, kind, rng)
            pred = generate(model, processor, image, question, max_new_tokens=160)
            short = final_answer(pred)
            if kind == "cell":
                restated = short.startswith("the " + question[len("What is in the "):-1] + " ")
            elif kind == "relation":
                m = re.match(r"Is the (\w+ \w+) .* the (\w+ \w+)\?", question)
                restated = short.startswith(f"the {m[1]} is in the") and f"and the {m[2]} is in the" in short
            else:
                restated = question.split()[2][:-1] in short
            counts[kind, "right" if short == final_answer(answer) else "wrong",
                   "description right" if pred.startswith(describe(scene)) else "description wrong",
                   "restated" if restated else "misquoted"] += 1
else:
    for seed in range(VAL_OFFSET, VAL_OFFSET + 80):
        scene = make_scene(seed)
        question, answer = ask(scene, "relation", random.Random(3 * seed + 1))
        pred = generate(model, processor, render(scene), question, max_new_tokens=48)
        word = re.search(r"left of|right of|above|below", question)[0]
        counts[word, "true " + answer.rsplit(" ", 1)[-1], "said " + pred.rsplit(" ", 1)[-1]] += 1
for key in sorted(counts):
    print(*key, counts[key], sep=" | ")
