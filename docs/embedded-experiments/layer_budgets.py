"""Per-layer budgets of VL-Cache and PrefixKV on the default model (2 validation scenes, prefill only).

    ./run.sh python docs/embedded-experiments/layer_budgets.py

Entries each of the 30 layers keeps after the prefill, mean over the scenes, at budgets
0.3 / 0.5 / 0.7 (read from the trace: `trace.layer_budget_entries()`). Recorded in docs/results.md.
"""
import torch, elastic, numpy as np
from elastic import datasets
torch.set_num_threads(1)
model, processor = elastic.load_model()
s = datasets.synthetic(2)
for m in ["vlcache", "prefixkv"]:
  for b in (0.3, 0.5, 0.7):
    ks=[]
    for x in s:
        g = elastic.generate(model, processor, x.load_image(), x.messages, method=m, budget=b, max_new_tokens=1, start_size=1)
        ks.append(g.trace.layer_budget_entries())
    k=np.mean(ks,axis=0); T=g.trace.prompt_length
    print(m, b, "T", T, "min", k.min(), "max", k.max(), "layers<=5%T:", int((k<=0.05*T).sum()), "at T:", int((k>=T).sum()), np.round(k).astype(int).tolist())
