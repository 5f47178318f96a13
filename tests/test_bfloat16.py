"""bfloat16 on CPU: every policy of the registry against a float32 run of the same weights.

How the two runs are compared (``test_bfloat16_matches_float32``):

* One model is built in float32 (``tiny_llava``: 64 image tokens, and ``tiny_qwen2vl``: a
  6 x 6 grid of merged patches, from ``tests/tiny.py``), with the text decoder's queries
  scaled per layer (a *profile*: ``stock``, the init, near-uniform attention and real ties;
  ``content``, x20, attention follows content; ``layered``, four layers scaled 1 / 20 / 60 / 3,
  so layers differ in attention mass and sparsity and the per-layer-budget policies give
  them different budgets); the bfloat16 model is a ``deepcopy(...).to(bfloat16)`` of it, and
  its floating inputs (pixel values) are cast the same way. Both caches get the same prompt
  annotations (``elastic.generation.prompt_annotations``: spans, image grid).
* The float32 run is plain greedy ``generate`` through ``elastic.make_cache(method, ...)``;
  the bfloat16 run is greedy ``generate`` with a logits processor that forces the float32
  run's tokens, so both caches see the same token sequence and their decode decisions are
  comparable step by step. Every method in ``elastic.METHODS`` is run (added methods are
  covered automatically) on every model and profile, in both layouts of ``elastic.LAYOUTS``
  for the ``layered`` profile (layers of different lengths) and in the default layout
  otherwise; a few of Elastic's, LOOK-M's and VL-Cache's variants (``VARIANTS``: the cosine
  merge, per-head scores, shared scores, a query-weighted score, decode-time accumulation,
  a growing cache) in the default layout.
* Ties: two float32 scores ``a``, ``b`` tie within bfloat16 precision when
  ``|a - b| <= TIE_RTOL * max(|a|, |b|) + TIE_ATOL * (the row's largest |score|)``.
* Per-layer budgets (PrefixKV, VL-Cache: ``policy.budgets_per_layer``). The layers' counts
  are decided by a statistic of every layer (PrefixKV: the layer's scores, whose cumulative
  mass meets one shared threshold; VL-Cache: the layer's attention sparsity), recorded from
  ``policy.layer_budgets`` in both runs. Checked, exactly: in each run the counts over all
  layers sum to ``elastic.budget.layer_total`` (one total, whatever the split), every
  layer kept ``keep_count`` of the budget the rule gave it (``trace.layers[l].budget``,
  ``budget_entries``), and its lengths and evictions follow that budget (``policy.capacity``).
  Between the runs: the statistics agree within bfloat16 precision (scores within
  ``SCORE_RTOL``, sparsity shares within ``SHARE_ATOL``); a layer's count may then differ
  from float32's only by at most ``COUNT_TOL`` entries. As the count is the rule's answer
  to its run's statistics, a difference means the rule's answer changes between two sets of
  statistics within bfloat16 precision of each other: float32's statistics tie at one of
  the rule's boundaries (the mass threshold, a rounding remainder). Every other difference
  (a wrong total, a budget given to the wrong layer, statistics off) fails. A layer whose
  count differs is compared at the prefill against float32's own plan at bfloat16's budget
  (the policy's ``plan_prefill`` on float32's scores), and not compared while decoding.
  No such tie occurs with these prompts on this machine, so
  ``test_layer_budget_tie_is_tolerated`` makes one: both runs get float32's VL-Cache
  statistics with one layer's sparsity at a boundary of the rule (bisection), 1e-9 below
  it for float32 and above it for bfloat16, and the whole comparison must pass with the
  split differing. ``test_layer_budget_checks_fail`` shows that statistics in the wrong
  order or off by more than the precision, a wrong total, and a budget moved between
  layers without the statistics saying so are all caught.
* Prefill, per layer and per row (a per-head policy: per KV head, ``trace.heads``): the kept
  position sets must be equal, or else every position in their symmetric difference ``D``
  has a float32 score tied (as above) with every other one of ``D``: a narrow band, which
  for a top-k selection means they sit at the k-th score (a boundary tie). For ``h2o-ref``,
  which keeps *rank positions* (the reference code's bug), the comparison is made in rank
  space: at every rank position in ``D`` the token float32 ranks there and the token
  bfloat16 ranks there (by its own recorded scores) must have tied float32 scores.
* Groups (anchors), by the policy's merge rule (its options): keep-or-evict policies merge
  nothing in either run. Elastic's position merge: in each run, every merged position joins
  its nearest unprotected kept entry by position (the earlier one at a midpoint), so
  bfloat16's groups are exactly that map of bfloat16's own kept set. A similarity merge
  (LOOK-M's pivot merge, Elastic's ``prefill="similar"``): in each run every merged position
  joins a kept entry whose key (the keys the policy was handed at the prefill, recorded) is
  the most cosine-similar to its own, within ``COS_OWN``; between the runs, a position may
  join another entry only if one of the two entries is in ``D``, or if its float32 key is as
  cosine-similar to both within ``COS_ATOL``.
* Decode, per layer and row: the victims (recorded from ``policy.decode_victim`` with the
  entries held and their accumulated scores) must be the same positions at every step
  until the first step where they differ; that difference is allowed only for a
  score-driven rule whose float32 accumulated scores of the two victims tie (a position
  rule, e.g. Elastic's fixed point or Local, must never differ), and after it (or after a
  prefill tie) the layer's later steps are no longer compared. Nor are a layer's steps
  after one where a layer below it held other entries in the two runs (the decoded tokens'
  hidden states then differ by more than rounding; the prefill attends over the whole
  prompt, so every layer's prefill is compared). Where neither the layer nor a layer below
  ever diverged, its final K/V (ordered by position) equal float32's within ``KV_RTOL``
  (measured: below 2% of the tensor's maximum).
* Scores: bfloat16's recorded prefill scores equal float32's within ``SCORE_RTOL``; the
  cache holds them (and H2O-style accumulated decode scores) as float32 tensors, and the
  trace's arrays are float32.
* Lengths, within each run: after the prefill a layer holds at most ``policy.capacity``
  under its own budget, after each decode step one entry more or its capacity, and the
  evictions recorded at a step are what it dropped.
* Structure: every field of the traces is compared: the same values for everything that
  does not depend on the dtype (lengths, layer lengths, budgets, protected set, fixed
  point, spans, options, eviction steps and layers ...; with per-layer budgets, those of
  the layers whose counts agree), the same shapes and dtypes for the arrays, and
  ``bytes_per_entry`` exactly half. ``cache.kv_bytes()``, ``allocated_bytes()`` and
  ``trace.kv_bytes()`` are exactly half of float32's (where per-layer counts differ: the
  bytes of one entry are exactly half), with K/V stored as bfloat16.

``attention_received`` and ``attention_sparsity`` are checked on their own with bfloat16
inputs against a float64 loop (``test_attention_received_accumulates_bfloat16_in_float32``,
``test_attention_sparsity_of_bfloat16_in_float32``): the sums over many queries are
float32 and keep each column to float32 precision.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

import elastic
from elastic.budget import keep_count, layer_total
from elastic.generation import prompt_annotations
from tiny import qwen2vl_inputs, tiny_llava, tiny_qwen2vl

BUDGET, DISTANCE, NEW_TOKENS = 0.5, -4, 10
TIE_RTOL, TIE_ATOL = 0.03, 0.01  # a tie within bfloat16 precision (measured errors: below 1%)
SCORE_RTOL = 0.03  # bfloat16's scores against float32's (relative, and of the row's maximum)
SHARE_ATOL = 0.005  # bfloat16's attention sparsity against float32's (measured: below 0.0025)
COUNT_TOL = 3  # entries a layer's budget may move at a tie of the per-layer rule
COS_ATOL = 0.02  # cosine similarities of float32 keys that tie
COS_OWN = 1e-4  # a run's own merge: its target is the most similar, to float32 rounding
KV_RTOL = 0.05  # final K/V against float32's (relative, and of the tensor's maximum)
RANK_POSITION_METHODS = {"h2o-ref"}  # keep rank positions, not top-k positions (SPEC 2)
LAYOUTS = list(elastic.LAYOUTS) if "layout" in inspect.signature(elastic.make_cache).parameters else [None]
MODELS = ["llava", "qwen2vl"]
PROFILES = {"stock": (1.0, 1.0), "content": (20.0, 20.0), "layered": (1.0, 20.0, 60.0, 3.0)}
VARIANTS = [  # code paths the registry's defaults do not take
    ("elastic", {"prefill": "similar"}),
    ("elastic", {"scope": "head", "decode": "lowest-frequency"}),
    ("elastic", {"scope": "shared", "importance": "moving-average"}),
    ("elastic", {"importance": "debiased", "prefill": "evict"}),
    ("lookm", {"heads": "mean"}),
    ("vlcache", {"hold_budget": False}),
]


# -- models and runs -----------------------------------------------------------------------

@functools.cache
def models(kind: str, profile: str):
    """(float32 model, bfloat16 copy, float32 inputs, bfloat16 inputs, annotations)."""
    sharpness = PROFILES[profile]
    if kind == "llava":
        model, processor = tiny_llava(image_size=64, layers=len(sharpness))
        text = processor.apply_chat_template([elastic.user_message("what is the colour ?", True)],
                                             add_generation_prompt=True, tokenize=False)
        inputs = dict(processor(text=[text], images=[Image.new("RGB", (40, 30), (200, 40, 30))],
                                return_tensors="pt"))
    else:
        model, inputs = tiny_qwen2vl(layers=len(sharpness)), qwen2vl_inputs(grid=(6, 6))
    with torch.no_grad():
        for layer, s in zip(model.model.language_model.layers, sharpness, strict=True):
            layer.self_attn.q_proj.weight.mul_(s)
    elastic.attach(model)
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.float32
    inputs_half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    return model, half, inputs, inputs_half, prompt_annotations(model, inputs)


class Force(LogitsProcessor):
    """Greedy decoding forced onto given tokens (the float32 run's)."""

    def __init__(self, tokens: list[int], prompt_length: int):
        self.tokens, self.T = tokens, prompt_length

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.tokens[input_ids.shape[1] - self.T]] = 0.0
        return forced


def recorded_cache(method: str, layout, annotations: dict, params: dict, stats_bug=None, rule=None):
    """A cache whose policy records what it was handed: each prefill plan's scores and
    prompt (keys included, per layer), the per-layer rule's statistics and answer, and
    every decode victim with the entries held and their scores at that moment.
    For tests of the comparison itself, ``stats_bug(stats)`` changes the layers' statistics
    before the policy sees them, and ``rule(layer_budgets, stats, T, spans)`` stands in for
    the policy's per-layer rule."""
    kwargs = {} if layout is None else {"layout": layout}
    cache = elastic.make_cache(method, budget=BUDGET, distance=DISTANCE, **kwargs, **params)
    cache.annotate(**annotations)
    policy = cache.policy
    log = {"plans": [], "budgets": [], "victims": [], "plan": policy.plan_prefill}
    plan, victim, budgets = policy.plan_prefill, policy.decode_victim, policy.layer_budgets

    def plan_prefill(scores, prompt):
        keys = None if prompt.keys is None else prompt.keys.detach().float().clone()
        log["plans"].append((None if scores is None else scores.detach().float().clone(),
                             dataclasses.replace(prompt, keys=keys)))
        return plan(scores, prompt)

    def layer_budgets(stats, prompt_length, spans=None):
        if stats_bug is not None:
            stats = stats_bug(list(stats))
        out = budgets(stats, prompt_length, spans) if rule is None else rule(budgets, stats, prompt_length, spans)
        log["budgets"].append(([s.detach().clone() if torch.is_tensor(s) else s for s in stats], list(out)))
        return out

    def decode_victim(layer):
        slot = victim(layer)
        acc = layer.accumulated
        log["victims"].append(dict(layer=layer.layer_idx, step=layer.seen - layer.prompt_length,
                                   positions=layer.positions.clone(), slot=slot.clone(),
                                   accumulated=None if acc is None else acc.detach().clone()))
        return slot

    policy.plan_prefill, policy.decode_victim, policy.layer_budgets = plan_prefill, decode_victim, layer_budgets
    return cache, log


def run_pair(kind, profile, method, layout, params=None, stats_bug=None, rule=None, stats_bug32=None):
    m32, m16, i32, i16, annotations = models(kind, profile)
    T = i32["input_ids"].shape[1]
    c32, log32 = recorded_cache(method, layout, annotations, params or {}, stats_bug32)
    c16, log16 = recorded_cache(method, layout, annotations, params or {}, stats_bug, rule)
    with torch.no_grad():
        out32 = m32.generate(**i32, cache=c32, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False)
        out16 = m16.generate(**i16, cache=c16, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, logits_processor=LogitsProcessorList([Force(out32[0, T:].tolist(), T)]))
    assert torch.equal(out16, out32)  # the same sequence went through both caches
    return (c32, log32), (c16, log16)


# -- comparisons -----------------------------------------------------------------------------

def tied(a: float, b: float, scale: float) -> bool:
    return abs(a - b) <= TIE_RTOL * max(abs(a), abs(b)) + TIE_ATOL * scale


def nearest_anchor(anchors: list[int], p: int) -> int:
    """The nearest anchor by position, the earlier one at a midpoint."""
    return min(anchors, key=lambda a: (abs(a - p), a))


def merge_rule(options: dict) -> str | None:
    """How the policy folds what it does not keep: by ``position``, by ``cosine`` key
    similarity, or not at all (None: kept or evicted)."""
    if options.get("prefill") == "merge":
        return "position"
    if options.get("prefill") == "similar" or options.get("merge") == "pivot":
        return "cosine"
    assert options.get("prefill") in (None, "evict"), f"no comparison for prefill={options['prefill']!r}"
    return None


def unit_keys(keys: torch.Tensor) -> torch.Tensor:
    """One row's prefill keys ``[heads, T, D]`` as unit vectors ``[T, heads * D]`` (as the merge sees them)."""
    T = keys.shape[1]
    return torch.nn.functional.normalize(keys.permute(1, 0, 2).reshape(T, -1).double(), dim=-1)


def check_own_merge(rule, t: elastic.LayerTrace, keys, protected: set, where: str):
    """A run's groups follow its own merge rule, on its own kept set (and its own keys)."""
    T = len(t.group)
    positions = np.arange(T)
    kept = np.isin(positions, t.kept)
    merged = (t.group >= 0) & (t.group != positions)
    assert not (merged & kept).any() and np.isin(t.group[merged], t.kept).all(), f"{where}: groups point past the kept set"
    if rule is None:
        np.testing.assert_array_equal(t.group, np.where(kept, positions, -1), err_msg=f"{where}: merged")
        return
    anchors = [int(a) for a in t.kept if int(a) not in protected]
    assert (t.group >= 0).all(), f"{where}: a merging policy evicted {np.flatnonzero(t.group < 0).tolist()}"
    if rule == "position":
        expected = [p if kept[p] else nearest_anchor(anchors, p) for p in range(T)]
        assert t.group.tolist() == expected, f"{where}: groups are not the position merge of the kept set"
        return
    x = unit_keys(keys)
    targets = torch.as_tensor(anchors if anchors else t.kept.tolist())
    similarity = x @ x[targets].T  # [T, targets]
    for p in np.flatnonzero(merged).tolist():
        own = float(x[p] @ x[int(t.group[p])])
        assert own >= float(similarity[p].max()) - COS_OWN, (
            f"{where}: position {p} joins {int(t.group[p])} (cosine {own:.4f}), "
            f"not its most similar target {int(targets[similarity[p].argmax()])} ({float(similarity[p].max()):.4f})")


def check_prefill(method, rule, a: elastic.LayerTrace, b: elastic.LayerTrace, keys32, keys16,
                  protected: set, where: str) -> bool:
    """Compare one row's prefill decision; return True if bfloat16 took a tie the other way."""
    k32, k16 = set(a.kept.tolist()), set(b.kept.tolist())
    assert len(k32) == len(k16), f"{where}: {len(k16)} entries kept in bfloat16, {len(k32)} in float32"
    diff = sorted(k32 ^ k16)
    if diff:
        assert a.scores is not None, f"{where}: a policy without scores kept {diff} differently"
        T = len(a.group)
        s32, s16, scale = a.scores, b.scores, float(np.abs(a.scores).max())
        if method in RANK_POSITION_METHODS:  # rank r kept iff the token ranked r qualifies
            o32 = np.argsort(s32[:T - 1], kind="stable")
            o16 = np.argsort(s16[:T - 1], kind="stable")
            bad = [r for r in diff if r < T - 1 and not tied(s32[o32[r]], s32[o16[r]], scale)]
        else:
            bad = [(p, q) for p in diff for q in diff if not tied(s32[p], s32[q], scale)]
        assert not bad, (f"{where}: kept sets differ at {diff} (float32 scores {s32[diff].tolist()}), "
                         f"not a tie: {bad[:4]}")
    check_own_merge(rule, a, keys32, protected, f"{where} (float32)")
    check_own_merge(rule, b, keys16, protected, f"{where} (bfloat16)")
    if rule == "cosine":  # a position joins another entry than in float32 only at a similarity tie
        x = unit_keys(keys32)
        for p in np.flatnonzero(a.group != b.group).tolist():
            g32, g16 = int(a.group[p]), int(b.group[p])
            if g32 in diff or g16 in diff:
                continue
            c32, c16 = float(x[p] @ x[g32]), float(x[p] @ x[g16])
            assert abs(c32 - c16) <= COS_ATOL, (f"{where}: position {p} joins {g16} in bfloat16, {g32} in "
                                                f"float32 (float32 cosine {c16:.4f} vs {c32:.4f})")
        return bool(diff) or not np.array_equal(a.group, b.group)
    return bool(diff)


def victims_of(log, layer: int, row: int):
    out = []
    for v in (v for v in log["victims"] if v["layer"] == layer):
        positions = v["positions"][row]
        slot = int(v["slot"][row])
        acc = None if v["accumulated"] is None else v["accumulated"][row]
        out.append((v["step"], positions, int(positions[slot]), acc))
    return out


NEVER = 10 ** 9  # a step after every step: the entries never diverged


def check_decode(log32, log16, layer: int, row: int, diverged: int, until: int, where: str) -> int:
    """Compare one row's decode victims at the steps up to ``until`` (after it, a layer
    below held other entries, so this layer's attention is no longer comparable); return
    the step after which the row's entries may differ (``diverged``: 0 after a prefill tie,
    ``NEVER`` if they never did)."""
    v32, v16 = victims_of(log32, layer, row), victims_of(log16, layer, row)
    assert len(v32) == len(v16), f"{where}: {len(v16)} evictions in bfloat16, {len(v32)} in float32"
    for (step32, pos32, victim32, acc32), (step16, pos16, victim16, acc16) in zip(v32, v16):
        assert step32 == step16, f"{where}: evictions at different steps"
        assert acc16 is None or acc16.dtype == torch.float32, f"{where}: accumulated scores in {acc16.dtype}"
        if step32 > min(diverged, until):
            return min(diverged, until)  # no longer compared
        if sorted(pos32.tolist()) != sorted(pos16.tolist()):
            raise AssertionError(f"{where}: step {step32}: different entries held without a tie before")
        if victim32 == victim16:
            continue
        assert acc32 is not None, f"{where}: step {step32}: a position rule evicted {victim16} vs {victim32}"
        i32 = int((pos32 == victim32).nonzero())
        i16 = int((pos32 == victim16).nonzero())
        a, b = float(acc32[i32]), float(acc32[i16])
        assert tied(a, b, float(acc32.abs().max())), (
            f"{where}: step {step32}: bfloat16 evicted {victim16} (float32 score {b:.5f}), "
            f"float32 {victim32} ({a:.5f}): not a tie")
        return step32
    return min(diverged, until)


def as_numpy(stat) -> np.ndarray:
    return np.asarray(stat.double().cpu() if torch.is_tensor(stat) else stat, dtype=np.float64)


def check_layer_budgets(c32, c16, log32, log16, t32: elastic.Trace, t16: elastic.Trace, where: str) -> list[bool]:
    """A per-layer-budget policy's split (see the module docstring); returns, per layer,
    whether bfloat16's count differs from float32's (at a tie of the rule)."""
    T, L = t32.prompt_length, len(t32.layers)
    rule = dataclasses.replace(c32.policy)  # a fresh copy: the policy's own rule, not the recorder
    minimum = rule.min_entries(T, c32.spans)
    total = layer_total(BUDGET, T, L, minimum)
    runs = []
    for t, log, name in ((t32, log32, "float32"), (t16, log16, "bfloat16")):
        counts = [len(layer.kept) for layer in t.layers]
        assert sum(counts) == total, f"{where}: {name} keeps {sum(counts)} entries over the layers, not {total}"
        assert len(log["budgets"]) == 1, f"{where}: {name}: {len(log['budgets'])} budget decisions"
        stats, budgets = log["budgets"][0]
        assert rule.layer_budgets(stats, T, c32.spans) == budgets, \
            f"{where}: {name}: the layers' budgets are not the rule's answer to their statistics"
        assert [layer.budget for layer in t.layers] == budgets, f"{where}: {name}: layers hold other budgets"
        assert counts == [keep_count(b, T, minimum) for b in budgets], f"{where}: {name}: counts {counts}"
        assert [layer.budget_entries for layer in t.layers] == counts, f"{where}: {name}: budget_entries"
        runs.append((counts, [as_numpy(s) for s in stats]))
    (n32, s32), (n16, s16) = runs
    assert len(s32) == len(s16) == L
    for l, (x, y) in enumerate(zip(s32, s16)):
        assert x.shape == y.shape, f"{where}/layer {l}: statistics of shapes {y.shape}, {x.shape}"
        if x.ndim == 0:  # a share of attention weights (VL-Cache's sparsity)
            assert abs(float(x) - float(y)) <= SHARE_ATOL, \
                f"{where}/layer {l}: the statistic of the layer budgets: sparsity {float(y):.4f} vs {float(x):.4f}"
        else:  # scores (PrefixKV's mass curve)
            np.testing.assert_allclose(y, x, rtol=SCORE_RTOL, atol=SCORE_RTOL * float(np.abs(x).max()),
                                       err_msg=f"{where}/layer {l}: the statistic of the layer budgets")
    moved = [abs(a - b) for a, b in zip(n32, n16)]
    assert max(moved) <= COUNT_TOL, f"{where}: layer counts {n16} in bfloat16, {n32} in float32"
    return [m > 0 for m in moved]


def check_lengths(policy, spans, t: elastic.Trace, where: str):
    """Within one run: after the prefill each layer holds at most its capacity (under its
    own budget), after a decode step one more entry than before, or its capacity if that
    is less; its evictions at a step are what it dropped then."""
    T, ll = t.prompt_length, t.layer_lengths
    assert ll.shape == (len(t.lengths), len(t.layers)), f"{where}: layer_lengths {ll.shape}"
    capacity = np.array([[policy.capacity(T + s, T, spans, layer.budget) for layer in t.layers]
                         for s in range(len(ll))])
    assert (ll[0] == [len(layer.kept) for layer in t.layers]).all() and (ll[0] <= capacity[0]).all(), \
        f"{where}: lengths after the prefill {ll[0]}"
    np.testing.assert_array_equal(ll[1:], np.minimum(capacity[1:], ll[:-1] + 1), err_msg=f"{where}: layer lengths")
    means = [int(n) if float(n).is_integer() else float(n) for n in ll.mean(axis=1)]
    assert t.lengths == means, f"{where}: lengths {t.lengths} are not the layers' mean {means}"
    for s in range(1, len(ll)):
        for l in range(len(t.layers)):
            n = int(((t.evictions[:, 0] == s) & (t.evictions[:, 1] == l)).sum())
            assert n == ll[s - 1, l] + 1 - ll[s, l], f"{where}: step {s}, layer {l}: {n} evictions"


def check_structure(policy, spans, t32: elastic.Trace, t16: elastic.Trace, moved: list[bool], where: str):
    """Every field: equal where the dtype cannot matter, the same shapes, half the bytes.
    With per-layer budgets, layers whose count ``moved`` at a tie are held to their own budget."""
    same = [l for l, m in enumerate(moved) if not m]
    for t, name in ((t32, "float32"), (t16, "bfloat16")):
        check_lengths(policy, spans, t, f"{where} ({name})")
        if t.fixed_point is not None:  # the trace's N_tl is layer 0's
            assert t.fixed_point == policy.fixed_point(len(t.layers[0].kept), t.prompt_length), f"{where}: N_tl"
    for f in dataclasses.fields(elastic.Trace):
        a, b = getattr(t32, f.name), getattr(t16, f.name)
        name = f"{where}: trace.{f.name}"
        if f.name == "bytes_per_entry":
            assert 2 * b == a, f"{name}: {b} bytes in bfloat16, {a} in float32"
        elif f.name == "layers":
            assert len(a) == len(b), name
            for l, (la, lb) in enumerate(zip(a, b)):
                for g in dataclasses.fields(elastic.LayerTrace):
                    x, y = getattr(la, g.name), getattr(lb, g.name)
                    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
                        assert x.dtype == y.dtype, f"{name}[{l}].{g.name}: {y.dtype} vs {x.dtype}"
                        assert x.shape == y.shape or (moved[l] and g.name == "kept"), \
                            f"{name}[{l}].{g.name}: {y.shape} vs {x.shape}"
                    elif not (moved[l] and g.name in ("budget", "budget_entries")):  # checked with the split
                        assert x == y, f"{name}[{l}].{g.name}: {y!r} vs {x!r}"
                if la.scores is not None:
                    assert la.scores.dtype == np.float32 == lb.scores.dtype, f"{name}.scores dtype"
        elif f.name == "evictions":  # positions may differ after a tie (checked in check_decode)
            assert a.dtype == b.dtype and a.shape[1:] == b.shape[1:], f"{name}: {b.shape} vs {a.shape}"
            ea, eb = a[np.isin(a[:, 1], same)], b[np.isin(b[:, 1], same)]
            np.testing.assert_array_equal(eb[:, :2], ea[:, :2], err_msg=f"{name}: steps and layers")
        elif f.name == "heads":
            assert (a is None) == (b is None) and (a is None or len(a) == len(b)), name
        elif f.name == "layer_lengths":
            assert a.shape == b.shape and a.dtype == b.dtype, f"{name}: {b.shape} vs {a.shape}"
            np.testing.assert_array_equal(b[:, same], a[:, same], err_msg=name)
            assert a[0].sum() == b[0].sum(), f"{name}: the prefill's total"
        elif f.name == "lengths" and any(moved):  # the layers' mean (check_lengths); after the prefill, the total's
            assert len(a) == len(b) and a[0] == b[0], f"{name}: {b} vs {a}"
        elif f.name == "fixed_point" and moved[0]:
            assert (a is None) == (b is None), name
        elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            assert a.shape == b.shape and a.dtype == b.dtype, f"{name}: {b.shape} vs {a.shape}"
            np.testing.assert_array_equal(b, a, err_msg=name)
        else:
            assert a == b, f"{name}: {b!r} in bfloat16, {a!r} in float32"


def entry_bytes(cache) -> list[int]:
    """Bytes of one entry's K and V in each layer."""
    return [(layer.keys[:1, :, :1].numel() + layer.values[:1, :, :1].numel()) * layer.keys.element_size()
            for layer in cache.layers]


def compare(method, kind, profile, layout, params=None, stats_bug=None, rule=None, stats_bug32=None):
    (c32, log32), (c16, log16) = run_pair(kind, profile, method, layout, params, stats_bug, rule, stats_bug32)
    policy, spans = c32.policy, c32.spans
    L = len(c32.layers)
    # The cache stores bfloat16, and one entry takes exactly half the bytes.
    for layer in c16.layers:
        assert layer.keys.dtype == layer.values.dtype == torch.bfloat16
    assert c32.layers[0].keys.dtype == torch.float32
    assert [2 * n for n in entry_bytes(c16)] == entry_bytes(c32)
    for c in (c32, c16):
        held = [layer.get_seq_length() for layer in c.layers]
        assert c.kv_bytes() == sum(n * e for n, e in zip(held, entry_bytes(c))) > 0
    traces32, traces16 = c32.traces, c16.traces
    assert len(traces32) == len(traces16) == 1
    where = f"{method}{params or ''}/{kind}/{profile}"
    moved = [False] * L
    if policy.budgets_per_layer:
        moved = check_layer_budgets(c32, c16, log32, log16, traces32[0], traces16[0], where)
    else:
        assert not log32["budgets"] and not log16["budgets"]
    # Scores are float32 wherever the cache keeps them.
    for l, (layer32, layer16) in enumerate(zip(c32.layers, c16.layers)):
        for name in ("prefill_scores", "accumulated"):
            x, y = getattr(layer32, name), getattr(layer16, name)
            assert (x is None) == (y is None), name
            if y is not None:
                assert y.dtype == torch.float32 == x.dtype, f"{where}/layer {l}: {name} in {y.dtype}"
                assert y.shape == x.shape or (moved[l] and name == "accumulated"), f"{where}/layer {l}: {name}"
    if not any(moved):  # the same lengths in every layer: exactly half the bytes
        assert 2 * c16.kv_bytes() == c32.kv_bytes()
        if hasattr(c32, "allocated_bytes"):
            assert 2 * c16.allocated_bytes() == c32.allocated_bytes()
        np.testing.assert_array_equal(2 * traces16[0].kv_bytes(), traces32[0].kv_bytes())
    else:  # at the prefill, the same total
        assert 2 * traces16[0].kv_bytes()[0] == traces32[0].kv_bytes()[0]
    heads32 = traces32[0].heads or [traces32[0]]
    heads16 = traces16[0].heads or [traces16[0]]
    assert len(heads32) == len(heads16)
    plans32, plans16 = log32["plans"], log16["plans"]
    assert len(plans32) == len(plans16) == L  # one prefill plan per layer
    protected = set(traces32[0].protected.tolist())
    rule = merge_rule(traces32[0].options)
    for row, (t32, t16) in enumerate(zip(heads32, heads16)):
        check_structure(policy, spans, t32, t16, moved, f"{where}/row {row}")
    until = NEVER  # the last decode step at which every layer below held the same entries in both runs
    for l in range(L):
        (scores32, prompt32), (_, prompt16) = plans32[l], plans16[l]
        diverged_at = []
        for row, (t32, t16) in enumerate(zip(heads32, heads16)):
            here = f"{where}/row {row}/layer {l}"
            a, b = t32.layers[l], t16.layers[l]
            if a.scores is not None:  # (the prefill attends over the whole prompt: every layer comparable)
                np.testing.assert_allclose(b.scores, a.scores, rtol=SCORE_RTOL,
                                           atol=SCORE_RTOL * float(np.abs(a.scores).max()), err_msg=f"{here}: scores")
            keys32 = None if prompt32.keys is None else prompt32.keys[row]
            keys16 = None if prompt16.keys is None else prompt16.keys[row]
            if moved[l]:  # float32's own plan at bfloat16's budget for this layer
                group = log32["plan"](scores32, dataclasses.replace(prompt32, budget=b.budget))[row].numpy()
                a = elastic.LayerTrace(scores=a.scores, kept=np.flatnonzero(group == np.arange(len(group))),
                                       group=group.astype(np.int64))
            tie = check_prefill(method, rule, a, b, keys32, keys16, protected, here)
            if moved[l]:  # another capacity while decoding: not comparable step by step
                diverged_at.append(0)
                continue
            diverged = check_decode(log32, log16, l, row, 0 if tie else NEVER, until, here)
            diverged_at.append(diverged)
            if diverged < NEVER:
                continue
            # The same entries at the end, and the same inputs: the same K/V up to bfloat16 rounding.
            x32, x16 = c32.layers[l], c16.layers[l]
            pos32, pos16 = x32.positions[row], x16.positions[row]
            o32, o16 = pos32.argsort(), pos16.argsort()
            assert torch.equal(pos32[o32], pos16[o16]), f"{here}: entries held"
            for name in ("keys", "values"):
                y32, y16 = x32._rows(getattr(x32, name))[row][:, o32], x16._rows(getattr(x16, name))[row][:, o16]
                torch.testing.assert_close(y16.float(), y32, rtol=KV_RTOL, atol=KV_RTOL * float(y32.abs().max()),
                                           msg=lambda m: f"{here}: {name}: {m}")
        until = min([until] + diverged_at)
    return moved


# -- the tests ----------------------------------------------------------------------------------

# Both layouts with the profile whose layers differ in length; the default one otherwise.
CASES = [(profile, layout) for profile in PROFILES for layout in (LAYOUTS if profile == "layered" else LAYOUTS[:1])]


@pytest.mark.parametrize("profile,layout", CASES, ids=[f"{p}-{x}" for p, x in CASES])
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("method", elastic.METHODS)
def test_bfloat16_matches_float32(method, kind, profile, layout):
    compare(method, kind, profile, layout)


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("method,params", VARIANTS, ids=lambda x: x if isinstance(x, str) else
                         "-".join(f"{k}={v}" for k, v in x.items()))
def test_bfloat16_matches_float32_variants(method, params, kind, profile):
    compare(method, kind, profile, LAYOUTS[0], params)


def sparsity_tie(kind: str):
    """``(stats, layer, below, above)``: float32's VL-Cache statistics of the ``layered``
    profile, with one layer's sparsity moved to a boundary of the rule (found by bisection):
    at ``below`` the layers' split is float32's, at ``above`` (within 1e-9) it is another."""
    (c32, log32), _ = run_pair(kind, "layered", "vlcache", LAYOUTS[0])
    stats, budgets = log32["budgets"][0]
    policy, T = dataclasses.replace(c32.policy), c32.traces[0].prompt_length

    def split(layer, value):
        return policy.layer_budgets([value if i == layer else float(s) for i, s in enumerate(stats)], T, c32.spans)

    for layer in range(len(stats)):
        for far in (0.0, 0.9):
            below, above = float(stats[layer]), far
            if split(layer, above) == budgets:
                continue
            while abs(above - below) > 1e-9:
                middle = (below + above) / 2
                below, above = (middle, above) if split(layer, middle) == budgets else (below, middle)
            return [float(s) for s in stats], layer, below, above
    raise AssertionError("no sparsity of one layer changes the layers' split")


@pytest.mark.parametrize("kind", MODELS)
def test_layer_budget_tie_is_tolerated(kind):
    """A tie of the per-layer rule, made on purpose: both runs' VL-Cache statistics set to
    float32's, with one layer's sparsity at a boundary of the rule, 1e-9 below it in
    float32 and above it in bfloat16, so that the layers' split differs. The whole
    comparison passes, the moved layers compared against float32's plan at their new
    budgets; the total and the bytes of one entry stay exact."""
    stats, layer, below, above = sparsity_tie(kind)

    def at(value):
        return lambda _: [torch.tensor(value if i == layer else s, dtype=torch.float64) for i, s in enumerate(stats)]

    moved = compare("vlcache", kind, "layered", LAYOUTS[0], stats_bug=at(above), stats_bug32=at(below))
    assert any(moved)


def _order(stats):  # the layers' statistics in the wrong order
    return stats[::-1]


def _off(stats):  # a sparsity off by more than bfloat16's precision
    return [s + 2 * SHARE_ATOL if i == 0 else s for i, s in enumerate(stats)]


def _total(layer_budgets, stats, T, spans):  # one entry too many over the layers
    return [b + (1 / T if i == 0 else 0) for i, b in enumerate(layer_budgets(stats, T, spans))]


def _moved(layer_budgets, stats, T, spans):  # one entry given to another layer than the rule says
    budgets = layer_budgets(stats, T, spans)
    return [b - 1 / T if i == 0 else b + 1 / T if i == 1 else b for i, b in enumerate(budgets)]


@pytest.mark.parametrize("method,stats_bug,rule,message", [
    ("vlcache", _order, None, "statistic of the layer budgets"),
    ("vlcache", _off, None, "statistic of the layer budgets"),
    ("prefixkv", _order, None, "statistic of the layer budgets"),
    ("prefixkv", None, _total, "entries over the layers"),
    ("vlcache", None, _moved, "not the rule's answer"),
    ("prefixkv", None, _moved, "not the rule's answer"),
], ids=["vlcache-order", "vlcache-off", "prefixkv-order", "prefixkv-total", "vlcache-moved", "prefixkv-moved"])
def test_layer_budget_checks_fail(method, stats_bug, rule, message):
    """The split checks catch a bfloat16 run whose per-layer budgets went wrong."""
    with pytest.raises(AssertionError, match=message):
        compare(method, "qwen2vl", "layered", LAYOUTS[0], stats_bug=stats_bug, rule=rule)


@pytest.mark.parametrize("per_head", [False, True])
def test_attention_received_accumulates_bfloat16_in_float32(per_head):
    """Many queries (three chunks) with peaked attention, in bfloat16: the column sums come
    back as float32 and equal a float64 loop over the same (bfloat16) values; a bfloat16
    running sum would be off by far more (its spacing at the large columns is about 1)."""
    g = torch.Generator().manual_seed(0)
    B, H, H_kv, S, D = 1, 4, 2, 300, 16
    query = (3 * torch.randn(B, H, S, D, generator=g)).to(torch.bfloat16)
    key = torch.randn(B, H_kv, S, D, generator=g).to(torch.bfloat16)
    got = elastic.attention_received(query, key, chunk=128, per_head=per_head)
    assert got.dtype == torch.float32
    q64 = query.double().view(B, H_kv, H // H_kv, S, D)
    logits = torch.einsum("bgnqd,bgsd->bgnqs", q64, key.double()) * D ** -0.5
    logits = logits.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    probs = logits.softmax(dim=-1).sum(dim=3)  # [B, H_kv, groups, S]
    expected = probs.mean(dim=2) if per_head else probs.sum(dim=2).sum(dim=1) / H
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert abs(float(got.double().sum()) - S * (H_kv if per_head else 1)) < 1e-3  # every query's row sums to 1
    assert float(expected.max()) > 8  # large columns, where bfloat16 could not hold the sum
    # The decode path (one query) and query weights (Elastic's moving average) as well.
    one = elastic.attention_received(query[:, :, -1:], key, per_head=per_head)
    assert one.dtype == torch.float32
    torch.testing.assert_close(one.double(), (logits[:, :, :, -1].softmax(dim=-1).mean(dim=2) if per_head else
                                              logits[:, :, :, -1].softmax(dim=-1).sum(dim=(1, 2)) / H),
                               rtol=1e-5, atol=1e-6)
    weights = torch.rand(S, generator=g)
    weighted = elastic.attention_received(query, key, chunk=128, weights=weights, per_head=per_head)
    assert weighted.dtype == torch.float32
    w = (logits.softmax(dim=-1) * weights.double()[:, None]).sum(dim=3)
    torch.testing.assert_close(weighted.double(), w.mean(dim=2) if per_head else w.sum(dim=(1, 2)) / H,
                               rtol=1e-5, atol=1e-5)


def test_attention_sparsity_of_bfloat16_in_float32():
    """VL-Cache's sparsity of bfloat16 queries and keys: float32, the share a float64 loop
    counts over the same values (every row averaged over the keys it sees)."""
    g = torch.Generator().manual_seed(1)
    B, H, H_kv, S, q, D = 1, 4, 2, 300, 200, 16
    query = (3 * torch.randn(B, H, q, D, generator=g)).to(torch.bfloat16)
    key = torch.randn(B, H_kv, S, D, generator=g).to(torch.bfloat16)
    got = elastic.scoring.attention_sparsity(query, key, threshold=0.01, chunk=64)
    assert got.dtype == torch.float32
    q64 = query.double().view(B, H_kv, H // H_kv, q, D)
    logits = torch.einsum("bgnqd,bgsd->bgnqs", q64, key.double()) * D ** -0.5
    future = torch.arange(S)[None, :] > torch.arange(S - q, S)[:, None]
    probs = logits.masked_fill(future, float("-inf")).softmax(dim=-1)
    small = (probs < 0.01 * probs.amax(dim=-1, keepdim=True)) & ~future
    expected = (small.sum(dim=-1).double() / (~future).sum(dim=-1)).mean(dim=(1, 2, 3))
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-4)  # a few weights at the threshold
    assert 0.1 < float(expected) < 0.9
