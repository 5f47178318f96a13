"""Exploratory fine-tune (not part of the recipe): does a second guided head pair,
one pair per object of a relation, let the model compare the two positions? And does
leaving shape counts unguided let it count?

    ./run.sh python docs/tiny-experiments/relation_split.py --init assets/tiny-llava \
        --vision-steps 0 --steps 400 --warmup 50 --threads 1 --eval-n 0 --out /tmp/split
    ./run.sh python docs/tiny-experiments/relation_split.py --control ...   # same, the shipped guide

Heads 2,3 (KV head 1) look at the first object of a relation, heads 4,5 (KV head 2) at
the second; every other question guides both pairs to all its evidence cells, except
"How many squares?" (no guidance). ``--control`` keeps the shipped guide unchanged.

The numbers in docs/tiny-model.md came from the first version of this script, which
built the two masks with its own copy of ``make_batch`` (same targets), on the data of
commit 2eaeba1 (relations answered "Yes."/"No.", shape counts guided to the shape's
cells); ``git checkout 2eaeba1`` reproduces that setting. This version passes the same
two evidence functions to ``train.make_batch`` in the current span form.
"""

import functools
import re
import sys

from elastic.tiny import train
from elastic.tiny.data import evidence_cells

RELATION = re.compile(r"Is the (\w+) (\w+) (?:left of|right of|above|below) the (\w+) (\w+)\?")


def split_evidence(scene, question):
    m = RELATION.fullmatch(question)
    if m:
        return ([o.cell for o in scene.objects if (o.colour, o.shape) == (m[1], m[2])],
                [o.cell for o in scene.objects if (o.colour, o.shape) == (m[3], m[4])])
    if question.startswith("How many") and "objects" not in question:
        return [], []
    cells = evidence_cells(scene, question)
    return cells, cells


def first_object(scene, question, answer):
    cells = split_evidence(scene, question)[0]
    return [(0, len(answer), cells)] if cells else []


def second_object(scene, question, answer):
    cells = split_evidence(scene, question)[1]
    return [(0, len(answer), cells)] if cells else []


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--control" in argv:
        argv.remove("--control")
    else:
        train.make_batch = functools.partial(train.make_batch, evidence=(first_object, second_object))
        argv += ["--look-heads", "2,3", "4,5"]
    train.main(argv)
