"""Why relation answers fail, for the written-out comparison of written-comparison.patch
("The red circle is in column one and the blue square is in column three: one left of
three, yes."): a wrong clause, a wrong copy in the comparison, or only the verdict wrong.
Relations only, the first N validation scenes, one question each.

    # the shipped recipe has these answer forms; for run B instead:
    # git checkout 9a1f906 && git apply docs/tiny-experiments/written-comparison.patch
    ./run.sh python docs/tiny-experiments/comparison_breakdown.py /tmp/model 100
"""
import random
import sys
from collections import Counter

import torch

from elastic.tiny import load
from elastic.tiny.data import VAL_OFFSET, ask, make_scene, render
from elastic.tiny.evaluate import generate

torch.set_num_threads(2)
model, processor = load(sys.argv[1])
counts = Counter()
for i in range(int(sys.argv[2])):
    scene = make_scene(VAL_OFFSET + i)
    question, answer = ask(scene, "relation", random.Random(i))
    got = generate(model, processor, render(scene), question, max_new_tokens=64)
    if got == answer:
        counts["right"] += 1
    elif ": " not in got:
        counts["no comparison written"] += 1
    elif got.split(": ", 1)[0] != answer.split(": ")[0]:
        counts["clauses wrong"] += 1
    elif got.rsplit(",", 1)[0] != answer.rsplit(",", 1)[0]:
        counts["comparison copied wrong"] += 1
    else:
        counts["only the verdict wrong, said " + got.rsplit(" ", 1)[1]] += 1
print(dict(counts))
