"""Paired bootstrap 95% intervals between methods of the saved grid (docs/results-smollm2).

    ./run.sh python docs/embedded-experiments/paired_grid.py

Reads the per-sample parts the evaluation wrote (no model run, a second) and prints, per
budget, the interval of ``other - base`` for pooled PPL and mean ROUGE-L
(:func:`elastic.ablation.paired_bootstrap`, 2000 resamplings of the 12 scenes).
"""
import json
from pathlib import Path

from elastic.ablation import paired_bootstrap

PARTS = Path(__file__).resolve().parents[1] / "results-smollm2" / "parts"
PAIRS = [("elastic", "prefixkv"), ("h2o", "prefixkv"), ("elastic", "vlcache"), ("tova", "vlcache"),
         ("elastic", "lookm"), ("h2o", "lookm")]


def rows(method, budget):
    return json.loads((PARTS / f"{method}-{budget:.3f}.json").read_text())["samples"]


print("| budget | other - base | ΔPPL [95% CI] | ΔROUGE-L [95% CI] |\n|---|---|---|---|")
for budget in (0.3, 0.5, 0.7):
    for base, other in PAIRS:
        r = paired_bootstrap(rows(base, budget), rows(other, budget))
        ppl, rouge = r["ppl_diff_ci"], r["rouge_l_diff_ci"]
        print(f"| {budget:g} | {other} - {base} | [{ppl[0]:+.3f}, {ppl[1]:+.3f}] | [{rouge[0]:+.3f}, {rouge[1]:+.3f}] |")
