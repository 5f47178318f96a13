"""Where a model's descriptions go wrong: over the first N validation scenes, how many
descriptions have an error, how many objects are missing or misdescribed (no object of
that colour and shape is described), and how many are described in another cell (most
common true -> described cells).

    ./run.sh python docs/tiny-experiments/misplaced.py /tmp/model 30
"""
import sys, torch
from collections import Counter
from elastic.tiny import load
from elastic.tiny.data import VAL_OFFSET, make_scene, render, DESCRIBE_PROMPT, CELLS
from elastic.tiny.evaluate import generate, score_description, parse_description
torch.set_num_threads(2)
model, proc = load(sys.argv[1]); bad = 0; misplaced = Counter(); wrongobj = 0
for i in range(int(sys.argv[2])):
    sc = make_scene(VAL_OFFSET + i); t = generate(model, proc, render(sc), DESCRIBE_PROMPT)
    s = score_description(sc, t); bad += s["all"] < s["objects"]
    preds = parse_description(t)["objects"]
    for o in sc.objects:
        where = [c for c, size, col, sh in preds if (col, sh) == (o.colour, o.shape)]
        if not where: wrongobj += 1
        elif o.cell not in where: misplaced[(CELLS[o.cell], CELLS[where[0]])] += 1
print("scenes with an error", bad, "objects missing/misdescribed", wrongobj, "misplaced", sum(misplaced.values()), misplaced.most_common(4))
