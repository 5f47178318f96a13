"""Fine-tune with relation-heavy chats (5 of 12 questions are relations): can the
model learn a relation's verdict from more examples? Needs short-answers.patch.

    git checkout 9a1f906 && git apply docs/tiny-experiments/short-answers.patch
    ./run.sh python -m elastic.tiny.train --out /tmp/short              # model 2 in docs/tiny-model.md
    ./run.sh python docs/tiny-experiments/relation_heavy.py --init /tmp/short --vision-steps 0 \
        --steps 600 --warmup 50 --lr 3e-4 --eval-n 0 --out /tmp/short_ft
    ./run.sh python -m elastic.tiny.evaluate --model /tmp/short_ft --seed 0 --n 200
"""

import sys

from elastic.tiny import data, train

data.QA_KINDS = data.QA_KINDS + ["relation"] * 4  # training chats draw their question kinds from this list
train.main(sys.argv[1:])
