"""PrefixKV's calibrated ratios: the mean over prompts of the naive search's per-layer shares."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import elastic
from elastic import calibrate
from elastic.datasets import Sample
from naive import run_layered
from tiny import tiny_llava


def samples():
    colours = ["red", "blue", "green"]
    return [Sample(id=f"s{i}", messages=[elastic.user_message(q, True)], answer="a shape",
                   image=Image.new("RGB", (32, 32), c))
            for i, (q, c) in enumerate(zip(["what is the colour ?", "is there a big shape here ?", "where is it ?"],
                                           colours))]


def test_ratios_are_the_mean_of_each_prompts_search():
    model, processor = tiny_llava(layers=3)
    elastic.attach(model)
    budget = 0.3
    ratios = calibrate.prefixkv_ratios(model, processor, samples(), budget, progress=False, start_size=1)
    expected = [0.0] * 3
    for sample in samples():
        inputs, annotations = elastic.generation.build_inputs(model, processor, sample.messages, sample.load_image())
        _, ref = run_layered(model, inputs["input_ids"], "prefixkv", budget, 1, start_size=1,
                             spans=annotations["spans"], prefill_inputs={"pixel_values": inputs["pixel_values"]})
        T = inputs["input_ids"].shape[1]
        expected = [e + k / T / 3 for e, k in zip(expected, ref["counts"])]
    assert ratios == pytest.approx(expected, abs=1e-6)
    assert sum(ratios) / 3 == pytest.approx(budget, abs=3 / 30)  # the budget, up to ceil and minimums

    # The calibrated cache spreads a new prompt's total in proportion to the ratios.
    cache = elastic.make_cache("prefixkv", budget=budget, start_size=1, ratios=ratios)
    inputs, annotations = elastic.generation.build_inputs(model, processor, samples()[0].messages,
                                                          samples()[0].load_image())
    cache.annotate(spans=annotations["spans"])
    with torch.no_grad():
        model(**inputs, cache=cache, use_cache=True)
    T = inputs["input_ids"].shape[1]
    counts = cache.layer_lengths[0].tolist()
    assert sum(counts) == elastic.budget.layer_total(budget, T, 3, 3)
    assert counts == elastic.budget.distribute(sum(counts), ratios, 3, T)


def test_no_samples_is_an_error():
    with pytest.raises(ValueError, match="at least one sample"):
        calibrate.prefixkv_ratios(None, None, [], 0.5)
