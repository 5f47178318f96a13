"""Every vision-language family of transformers 5.24 with every method, on tiny random models.

For each family of :mod:`tests.families` (2 decoder layers, hidden 64, built offline) and
each method of ``elastic.METHODS``, text-only and with images:

- the full cache reproduces plain greedy ``model.generate`` (transformers' own cache) token
  for token;
- a compressed cache keeps ``ceil(budget x T)`` entries per full-attention layer after the
  prefill (never below the policy's minimum), per-layer policies ``ceil(budget x layers x T)``
  in total, and the budget policies ``ceil(budget x tokens seen)`` per layer while decoding;
- the trace's spans are the prompt's image region exactly (the hand-built layout's image
  tokens and markers), with one grid per tile;
- the figures build.

The hybrid decoders (gemma3's sliding, qwen3_5's linear-attention, lfm2_vl's conv, llama4's
chunked layers, mistral3 with a sliding window) run on the layer-type cache. transformers 5.24's
Llama 4 cannot generate with images at all (its own bug): attach refuses it with the reason,
and its text decoder runs the grid text-only.
"""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import pytest
import torch

import elastic
import viz
import families

BUDGET = Fraction(1, 2)
NEW = 4
PER_LAYER = {"prefixkv", "vlcache"}  # one budget per layer, the total is the policy's
UNDER = {"h2o-ref"}  # the reference code's H2O keeps one entry under the budget (its documented defect)
# transformers 5.24's Llama4ForConditionalGeneration cannot generate (it reads outputs.image_outputs,
# which its output class lacks): attach refuses it, and its text decoder runs the grid text-only.
TEXT_ONLY = {"llama4"}
# A model-wide sliding window makes every layer a sliding one: nothing for a policy to compress
# (every method runs on transformers' windows and says so).
NO_FULL_ATTENTION = {"mistral3_sliding"}


@pytest.fixture(scope="module", params=list(families.BUILDERS))
def family(request):
    """One tiny model per family (built once), attached, with its plain-generate references."""
    fam = families.BUILDERS[request.param]()
    if fam.name in TEXT_ONLY:
        fam.model = fam.model.language_model
    fam.references = {}
    for with_image in (False,) if fam.name in TEXT_ONLY else (False, True):  # transformers' own cache
        inputs, _ = fam.inputs(with_image)
        fam.references[with_image] = plain_generate(fam.model, inputs)
    elastic.attach(fam.model)
    return fam


def plain_generate(model, inputs, cache=None):
    with torch.no_grad():
        extra = {} if cache is None else {"cache": cache}
        return model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                              pad_token_id=1, **extra)


def ceil(fraction) -> int:
    return math.ceil(fraction)


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
@pytest.mark.parametrize("method", elastic.METHODS)
def test_family_method(family, method, with_image):
    if with_image and family.name in TEXT_ONLY:
        pytest.skip(f"{family.name} cannot generate with images in transformers 5.24 (see test_llama4_is_refused)")
    inputs, layout = family.inputs(with_image)
    T = inputs["input_ids"].shape[1]
    cache = elastic.make_cache(method, budget=float(BUDGET))
    if family.name in NO_FULL_ATTENTION:  # transformers' own window on every layer, as plain generate
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            out = plain_generate(family.model, inputs, cache)
        assert out.tolist() == family.references[with_image].tolist()
        nothing = [w for w in said if "compresses nothing" in str(w.message)]
        assert len(nothing) == (method != "full"), "a compressing method must say it compresses nothing"
        assert cache.kv_bytes() == 0
        return
    out = plain_generate(family.model, inputs, cache)
    tiles = elastic.image_tiles(inputs, family.model)
    cache.annotate(image_tiles=tiles)  # the grids: plain generate hands the model no image_grid_thw etc.
    if method == "full":
        assert out.tolist() == family.references[with_image].tolist()

    trace = cache.trace
    # The spans: found by the attached model from the prompt, and exactly the image region.
    if with_image:
        first, last = min(layout.image), max(layout.image) + 1
        assert trace.spans["image"] == (first, last)
        assert set(layout.image) <= set(range(first, last))
        assert trace.spans.get("system") == (0, first) and trace.spans["instruction"] == (last, T)
        ids = inputs["input_ids"][0].tolist()
        between = [p for p in range(first, last) if p not in layout.image]  # text and delimiters between images
        assert elastic.spans.image_token_id(family.model) not in [ids[p] for p in between]
        assert [(t.rows, t.cols, list(t.positions)) for t in tiles] == layout.tiles
    else:
        assert trace.spans == {"instruction": (0, T)} and tiles == []

    # The budget on every full-attention (traced) layer.
    L = len(trace.layers)
    minimum = cache.policy.min_entries(T, trace.spans)
    prefill = trace.layer_lengths[0].tolist()
    if method == "full":
        assert prefill == [T] * L
    elif method in PER_LAYER:
        assert sum(prefill) == min(L * T, max(ceil(BUDGET * L * T), L * min(minimum, T)))
    else:
        assert prefill == [min(T, max(ceil(BUDGET * T), minimum)) - (method in UNDER)] * L
    seen = trace.tokens_seen
    assert seen == T + NEW - 1  # the last token is sampled, never fed
    final = trace.layer_lengths[-1].tolist()
    if method == "full":
        assert final == [seen] * L
    elif method in PER_LAYER:  # each layer holds its own ratio k_l / T while decoding
        assert final == [min(seen, max(minimum, ceil(Fraction(k, T) * seen))) for k in prefill]
    elif method in UNDER:
        assert all(k <= min(seen, max(ceil(BUDGET * seen), minimum)) for k in final)
    else:
        assert final == [min(seen, max(ceil(BUDGET * seen), minimum))] * L

    # The figures build (the image overlay draws every tile); once per family and prompt, they cost more
    # than a tiny model's generation.
    if method != "elastic":
        return
    for figure in (viz.attention_heatmap(trace), viz.merge_groups(trace), viz.cache_timeline(trace),
                   viz.image_overlay(trace)):
        assert figure.data or figure.layout.annotations
    if with_image:
        drawn = [d for d in viz.image_overlay(trace).data if d.name == "patches"]
        assert len(drawn) == 1
        cells = [c[0] for row in drawn[0].customdata for c in row if c is not None]
        assert sorted(cells) == sorted(p for t in tiles for p in t.positions)  # every cell of every tile, once


def test_llama4_is_refused_with_the_reason_and_its_spans_are_right():
    fam = families.llama4()
    with pytest.raises(ValueError, match="outputs.image_outputs.*elastic.attach\\(model.language_model\\)"):
        elastic.attach(fam.model)
    inputs, layout = fam.inputs(True)
    first, last = min(layout.image), max(layout.image) + 1
    assert elastic.prompt_spans(inputs, fam.model)["image"] == (first, last)
    tiles = elastic.image_tiles(inputs, fam.model)
    assert [(t.rows, t.cols, list(t.positions)) for t in tiles] == layout.tiles
    assert [t.kind for t in tiles] == ["tile", "tile", "global"]
