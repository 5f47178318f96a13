"""Which prompt tokens each method keeps on the default model (budget 0.5, 8 validation scenes).

    ./run.sh python docs/embedded-experiments/kept_by_span.py

For every layer and scene, the share of the system, image and instruction tokens that are
still entries of their own after the prefill (for Elastic: anchors; the rest is merged
into them), averaged. Result 2026-12-01 (118-token prompts, about a minute on one thread):
elastic system 0.50 image 0.52 instruction 0.35; h2o 0.31 / 0.48 / 1.00; local 0.04 / 0.56 / 1.00.
"""
import numpy as np, torch, elastic
from elastic.tiny.data import make_scene, render, VAL_OFFSET, DESCRIBE_PROMPT
torch.set_num_threads(1)
model, proc = elastic.load_model(device="cpu")
stats = {}
for m in ("elastic", "h2o", "local"):
    inst_kept, img_kept, sys_kept, inst_merged = [], [], [], []
    for i in range(8):
        r = elastic.generate(model, proc, render(make_scene(VAL_OFFSET + i)), DESCRIBE_PROMPT, method=m, budget=0.5, max_new_tokens=1)
        t = r.trace
        if i == 0 and m == "elastic": print(t.spans, t.prompt_length)
        for L in t.layers:
            kept = set(L.kept.tolist())
            for name, acc in (("instruction", inst_kept), ("image", img_kept), ("system", sys_kept)):
                if name in t.spans:
                    a, b = t.spans[name]; acc.append(np.mean([p in kept for p in range(a, b)]))
    print(m, "kept share: system %.2f image %.2f instruction %.2f" % (np.mean(sys_kept) if sys_kept else -1, np.mean(img_kept), np.mean(inst_kept)), flush=True)
