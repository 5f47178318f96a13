"""Stage 1 of train_smol with every image token aligned to its own cell's object.

Written for the squared-distance stage 1 of commit 3dbe45a (run it in a worktree of that
commit: ``git worktree add /tmp/at-3dbe45a 3dbe45a``). That code also started the tower
from random weights, not the tiny LLaVA's as it meant to (a key-prefix bug, fixed since).

    ./run.sh python docs/embedded-experiments/stage1_local_layout.py --out /tmp/exp3 --steps 0 \
        --eval-n 0 --text-prompts 0 --align-steps 400 --tower-lr-scale 1.0 --threads 2

Every patch row of a cell reads the cell's object ("large red circle", or "empty" three
times): no information has to move across the image. Only stage 1 runs (``--steps 0``);
the log's ``object_word_acc`` says how often an object token is nearest to its word.
Result (2026-12-01, 253 s): 0.18 at step 50, 0.42 at 150, 0.50-0.54 from step 300 on,
against 0.16-0.22 after 800 steps of the shipped reading-order layout (docs/embedded-model.md).
"""

import sys

from elastic.tiny import train_smol
from elastic.tiny.train import patch_cells


def local_words(scene) -> list[str]:
    words = []
    for index, cell in enumerate(patch_cells().tolist()):
        o = scene.at(cell)
        words.append(([o.size, o.colour, o.shape] if o else ["empty"] * 3)[index % 3])
    return words


if __name__ == "__main__":
    train_smol.slot_words = local_words
    train_smol.main(sys.argv[1:])
