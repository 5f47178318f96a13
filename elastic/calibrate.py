"""PrefixKV's offline configuration: per-layer keep ratios averaged over calibration prompts.

    python -m elastic.calibrate --samples 8 --budget 0.5            # default model, synthetic scenes
    python -m elastic.calibrate --samples 8 --json ratios.json

PrefixKV (Wang et al., NeurIPS 2025) searches its per-layer budgets on a few prompts and
ships their average: the ratios are then the same for every prompt. Here each calibration
prompt is prefilled through a :class:`~elastic.policies.PrefixKVPolicy` cache (whose
search gives that prompt's per-layer counts ``k_l``); the shares ``k_l / T`` are averaged
over the prompts. ``make_cache("prefixkv", ratios=...)`` then spreads every prompt's total
in proportion to them (:func:`elastic.budget.distribute`). ``python -m elastic.evaluate
--calibrate N`` does this on N scenes that are not among the evaluated ones.
"""

from __future__ import annotations

import argparse
import json

import torch
from tqdm import tqdm

from .cache import make_cache


def prefill_layer_counts(model, processor, sample, budget: float, **params) -> tuple[list[int], int]:
    """One prompt's per-layer counts ``k_l`` under PrefixKV's search, and its length ``T``."""
    from .generation import build_inputs

    inputs, annotations = build_inputs(model, processor, sample.messages, sample.load_image())
    cache = make_cache("prefixkv", budget=budget, **params)
    cache.annotate(spans=annotations["spans"])
    with torch.no_grad():
        model(**inputs, cache=cache, use_cache=True)  # the prefill: every layer's budget is set
    return cache.layer_lengths[0].tolist(), int(inputs["input_ids"].shape[1])


def prefixkv_ratios(model, processor, samples, budget: float = 0.5, progress: bool = True,
                    **params) -> tuple[float, ...]:
    """Per-layer shares ``mean over prompts of k_l / T`` (PrefixKV's calibrated ratios).

    Parameters
    ----------
    samples : list of :class:`elastic.datasets.Sample`
        Calibration prompts (not the evaluated ones).
    budget : float
        The budget the ratios are searched at (PrefixKV calibrates per budget).
    params
        Other :class:`~elastic.policies.PrefixKVPolicy` parameters (``start_size``...).

    Returns
    -------
    tuple of float
        One share per decoder layer, their mean ``~budget``; pass as ``ratios=``.
    """
    if not samples:
        raise ValueError("calibration needs at least one sample")
    params = {k: v for k, v in params.items() if k != "ratios"}
    sums = None
    for sample in tqdm(samples, desc="calibrate", unit="prompt", disable=not progress):
        counts, T = prefill_layer_counts(model, processor, sample, budget, **params)
        shares = [k / T for k in counts]
        sums = shares if sums is None else [a + b for a, b in zip(sums, shares)]
    return tuple(round(s / len(samples), 6) for s in sums)


def main(argv=None) -> tuple[float, ...]:
    from .models import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="hub id or folder (default: the shipped model)")
    ap.add_argument("--samples", type=int, default=8, help="calibration scenes")
    ap.add_argument("--first-seed", type=int, default=None,
                    help="first synthetic scene (default: after the ones elastic.evaluate uses)")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--start-size", type=int, default=1)
    ap.add_argument("--json", help="write the ratios to this file")
    args = ap.parse_args(argv)
    model, processor = load_model(args.model)
    samples = calibration_samples(args.samples, args.first_seed)
    ratios = prefixkv_ratios(model, processor, samples, args.budget, start_size=args.start_size)
    print(json.dumps({"budget": args.budget, "ratios": list(ratios)}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"budget": args.budget, "samples": args.samples, "ratios": list(ratios)}, f, indent=1)
    return ratios


CALIBRATION_SEED = 2_000_000  # scenes elastic.evaluate never evaluates (its seeds start at 1,000,000)


def calibration_samples(n: int, first_seed: int | None = None):
    from . import datasets

    return datasets.synthetic(n, first_seed=CALIBRATION_SEED if first_seed is None else first_seed)


if __name__ == "__main__":
    main()
