"""The paper's ablation table (and ours) on any model: one policy option changed at a time.

    python -m elastic.evaluate --ablation paper            # default model, budget 0.5, 50 scenes
    python -m elastic.evaluate --ablation beyond --samples 50
    python -m elastic.evaluate --ablation protocol            # the paper's baseline and positions, as run
    python -m elastic.evaluate --ablation all --model llava-hf/llava-1.5-7b-hf --data mm-vet.json

Each variant is Elastic Cache with one option changed (the options of
:class:`elastic.ElasticPolicy`), evaluated like every method (PPL of the reference answer
teacher-forced through the cache, ROUGE-L against the full cache's answer), with a paired
bootstrap 95% interval of its difference to the paper's default on the same samples.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# (name, method, options, what the paper reports at budget 0.5 on LLaVA-1.5-13B: PPL)
PAPER = [
    ("elastic", "elastic", {}, 3.60),
    ("importance-mean", "elastic", {"importance": "mean"}, 8.70),
    ("importance-moving-average", "elastic", {"importance": "moving-average"}, 8.43),
    ("scope-shared", "elastic", {"scope": "shared"}, 3.73),
    ("scope-head", "elastic", {"scope": "head"}, 3.75),
    ("prefill-evict", "elastic", {"prefill": "evict"}, 3.68),
    ("prefill-kmeans", "elastic", {"prefill": "kmeans"}, 3.61),
    ("decode-recent", "elastic", {"decode": "recent"}, 3.93),
    ("decode-lowest-frequency", "elastic", {"decode": "lowest-frequency"}, 3.75),
]
BEYOND = [
    ("elastic", "elastic", {}, None),
    ("protect-instruction", "elastic", {"protect": "instruction"}, None),
    ("protect-last-8", "elastic", {"protect": "last", "protect_last": 8}, None),
    ("importance-debiased", "elastic", {"importance": "debiased"}, None),
    ("importance-uniform", "elastic", {"importance": "uniform"}, None),
    ("h2o", "h2o", {}, None),
    ("local", "local", {}, None),
    ("snapkv", "snapkv", {}, None),
    ("tova", "tova", {}, None),
    # Which of Elastic's choices matters: its merge rule (by key similarity, not position),
    # and the vision-language peers (budgets per layer, a text prior, a similarity merge).
    ("prefill-similar", "elastic", {"prefill": "similar"}, None),
    ("prefixkv", "prefixkv", {}, None),
    ("vlcache", "vlcache", {}, None),
    ("lookm", "lookm", {}, None),
]
# How the paper's comparison was run: the reference code's H2O, and decoded tokens at the
# compressed cache's length (SPEC 2), against ours (textbook H2O, true positions).
PROTOCOL = [
    ("elastic", "elastic", {}, None),
    ("elastic-compressed-positions", "elastic", {"positions": "compressed"}, None),
    ("h2o", "h2o", {}, None),
    ("h2o-ref", "h2o-ref", {}, None),
    ("h2o-ref-compressed-positions", "h2o-ref", {"positions": "compressed"}, None),
]
ABLATIONS = {"paper": PAPER, "beyond": BEYOND, "protocol": PROTOCOL, "all": PAPER + BEYOND[1:] + PROTOCOL[1:]}
BASELINE = "elastic"


def variants(name: str, budget: float = 0.5) -> list[tuple[str, str, float, dict]]:
    """``(name, method, budget, options)`` of the named ablation, for :func:`elastic.evaluate.run_variants`."""
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation {name!r}; choose one of {', '.join(ABLATIONS)}")
    return [(n, method, budget, options) for n, method, options, _ in ABLATIONS[name]]


def paired_bootstrap(base: list[dict], other: list[dict], rounds: int = 2000, seed: int = 0) -> dict:
    """95% intervals of ``other - base`` for pooled PPL and mean ROUGE-L, resampling samples.

    ``base`` and ``other`` are per-sample rows (``nll``, ``tokens``, ``rouge_l``) of the same
    samples in the same order.
    """
    if [r["id"] for r in base] != [r["id"] for r in other]:
        raise ValueError("a paired bootstrap needs the same samples in the same order")
    rng = np.random.default_rng(seed)
    arrays = {key: (np.array([r[key] for r in base], float), np.array([r[key] for r in other], float))
              for key in ("nll", "tokens", "rouge_l")}
    idx = rng.integers(0, len(base), size=(rounds, len(base)))

    def pooled_ppl(nll, tokens):
        return np.exp(nll[idx].sum(axis=1) / tokens[idx].sum(axis=1))

    d_ppl = pooled_ppl(arrays["nll"][1], arrays["tokens"][1]) - pooled_ppl(arrays["nll"][0], arrays["tokens"][0])
    d_rouge = arrays["rouge_l"][1][idx].mean(axis=1) - arrays["rouge_l"][0][idx].mean(axis=1)
    return {"ppl_diff_ci": [float(np.percentile(d_ppl, 2.5)), float(np.percentile(d_ppl, 97.5))],
            "rouge_l_diff_ci": [float(np.percentile(d_rouge, 2.5)), float(np.percentile(d_rouge, 97.5))]}


def table(parts: list[dict], name: str) -> list[dict]:
    """One row per variant: PPL, ROUGE-L, differences to the paper's default with 95% intervals."""
    paper = {n: ppl for n, _, _, ppl in ABLATIONS[name]}
    by = {p["record"].get("variant", p["record"]["method"]): p for p in parts}
    base = by[BASELINE]
    rows = []
    for variant, part in by.items():
        record, samples = part["record"], part["samples"]
        row = {"variant": variant, "method": record["method"], "options": record.get("options", {}),
               "budget": record["budget"], "ppl": record["ppl"], "rouge_l": record["rouge_l"],
               "samples": record["samples"], "kv_kept": record["kv_kept"], "paper_ppl": paper.get(variant)}
        if variant not in ("full", BASELINE):
            row["ppl_diff"] = record["ppl"] - base["record"]["ppl"]
            row["rouge_l_diff"] = record["rouge_l"] - base["record"]["rouge_l"]
            row.update(paired_bootstrap(base["samples"], samples))
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    """The table as markdown: differences to the paper's default with their 95% intervals."""
    def ci(row, key):
        if f"{key}_diff" not in row:
            return ""
        lo, hi = row[f"{key}_diff_ci"]
        mark = " *" if lo > 0 or hi < 0 else ""  # the interval excludes 0
        return f"{row[f'{key}_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]{mark}"

    lines = ["| variant | PPL | ΔPPL vs default [95% CI] | ROUGE-L | ΔROUGE-L [95% CI] | paper PPL (13B) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        paper = f"{r['paper_ppl']:.2f}" if r.get("paper_ppl") else ""
        lines.append(f"| {r['variant']} | {r['ppl']:.3f} | {ci(r, 'ppl')} | {r['rouge_l']:.3f} | "
                     f"{ci(r, 'rouge_l')} | {paper} |")
    n = rows[0]["samples"] if rows else 0
    lines.append(f"\n{n} samples each; * marks a 95% interval that excludes 0 (paired bootstrap, 2000 rounds).")
    return "\n".join(lines)


def write(rows: list[dict], out, name: str) -> Path:
    """``ablation-NAME.json`` and ``ablation-NAME.md`` in ``out`` (ablations may share a folder
    and its saved parts, e.g. the full cache and the default Elastic)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ablation-{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    path = out / f"ablation-{name}.md"
    path.write_text(markdown(rows) + "\n")
    return path

