"""Which prompt tokens each method keeps on the default model (budget 0.5, 8 validation scenes).

    ./run.sh python docs/embedded-experiments/kept_by_span.py

For every layer (and KV head, for per-head policies) and scene, the share of the system,
image and instruction tokens that are still entries of their own after the prefill (for
Elastic: anchors; the rest is merged into them), averaged. The result, with the date and
the time it took, is recorded in docs/ablations.md.
"""
import time

import numpy as np
import torch

import elastic
from elastic.tiny.data import DESCRIBE_PROMPT, VAL_OFFSET, make_scene, render

VARIANTS = [
    ("elastic", "elastic", {}),
    ("elastic importance=mean", "elastic", {"importance": "mean"}),
    ("elastic importance=moving-average", "elastic", {"importance": "moving-average"}),
    ("elastic importance=debiased", "elastic", {"importance": "debiased"}),
    ("elastic importance=uniform", "elastic", {"importance": "uniform"}),
    ("elastic scope=shared", "elastic", {"scope": "shared"}),
    ("elastic scope=head", "elastic", {"scope": "head"}),
    ("h2o", "h2o", {}),
    ("h2o-ref", "h2o-ref", {}),
    ("local", "local", {}),
    ("snapkv", "snapkv", {}),
    ("tova", "tova", {}),
    ("elastic prefill=similar", "elastic", {"prefill": "similar"}),
    ("prefixkv", "prefixkv", {}),
    ("vlcache", "vlcache", {}),
    ("lookm", "lookm", {}),
]

torch.set_num_threads(1)
start = time.perf_counter()
model, processor = elastic.load_model(device="cpu")
images = [render(make_scene(VAL_OFFSET + i)) for i in range(8)]
print("| method | system | image | instruction |\n|---|---|---|---|")
for label, method, options in VARIANTS:
    shares = {"system": [], "image": [], "instruction": []}
    for image in images:
        trace = elastic.generate(model, processor, image, DESCRIBE_PROMPT, method=method, budget=0.5,
                                 max_new_tokens=1, **options).trace
        for head in trace.heads or [trace]:
            for layer in head.layers:
                kept = set(layer.kept.tolist())
                for name, values in shares.items():
                    if name in trace.spans:
                        a, b = trace.spans[name]
                        values.append(np.mean([p in kept for p in range(a, b)]))
    print(f"| {label} | " + " | ".join(f"{np.mean(v):.2f}" for v in shares.values()) + " |", flush=True)
print(f"\n{trace.prompt_length}-token prompts ({trace.spans}); {time.perf_counter() - start:.0f} s")
