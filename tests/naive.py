"""An independent, deliberately naive re-implementation of every policy, for the tests.

Python loops over positions on the attention maps of an *eager* run of the same weights
(``output_attentions=True``), a plain ``DynamicCache`` edited by hand, and the budget rule
computed with exact fractions. Nothing here imports the library's algorithm.
"""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import torch
from transformers import DynamicCache


def exact_keep(budget: float, tokens: int, minimum: int) -> int:
    return min(tokens, max(minimum, math.ceil(Fraction(str(budget)) * tokens)))


def eager_copy(model):
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    return eager


def column_sums(attn: torch.Tensor) -> list[float]:
    """attn [1, H, q, S] -> for every key j: mean over heads of sum over queries."""
    H, q, S = attn.shape[1:]
    out = []
    for j in range(S):
        total = 0.0
        for h in range(H):
            total += float(attn[0, h, :, j].double().sum())
        out.append(total / H)
    return out


def protected_of(method, T, start_size, protect="none", protect_last=8, spans=None):
    sinks = list(range(min(start_size, T)))
    if method == "elastic":
        extra = []
        if protect == "last":
            extra = list(range(max(0, T - protect_last), T))
        elif protect == "instruction":
            a, b = spans["instruction"]
            extra = list(range(a, b))
        last = [T - 1] if T - 1 >= len(sinks) else []
        return sorted(set(sinks) | set(extra) | set(last))
    if method == "local":
        return sinks
    if method == "h2o-ref":
        return [T - 1]
    return []


def head_columns(attn, rows, kv_head=None, weights=None):
    """attn [1, H, q, S] -> for every key j: sum over the query ``rows`` (times ``weights``),
    mean over the query heads (all, or those sharing ``kv_head``)."""
    H, q, S = attn.shape[1:]
    heads = list(range(H))
    if kv_head is not None:
        per = H // KV_HEADS[0]
        heads = [h for h in heads if h // per == kv_head]
    rows = list(rows)
    w = torch.tensor([1.0 if weights is None else weights[i] for i in rows], dtype=torch.float64)
    out = []
    for j in range(S):
        total = 0.0
        for h in heads:  # one key, one head at a time; the query rows as one weighted sum
            total += float((attn[0, h, rows, j].double() * w).sum())
        out.append(total / len(heads))
    return out


KV_HEADS = [2]  # set by run() from the model config


def importance_scores(method, attn, T, o, kv_head=None):
    """Prompt scores of one layer (one KV head, if given) by the options' definition."""
    rows = list(range(T))
    if method == "snapkv":
        w = min(o.get("window", 32), T)
        raw = head_columns(attn, rows[T - w:], kv_head)
        k, length = o.get("kernel", 5), T - w
        pooled = []
        for j in range(length):
            window = [raw[i] if 0 <= i < length else 0.0 for i in range(j - k // 2, j + k // 2 + 1)]
            pooled.append(sum(window) / k if o.get("pooling", "avg") == "avg"
                          else max(raw[i] for i in range(max(0, j - k // 2), min(length, j + k // 2 + 1))))
        return pooled + raw[length:]
    if method == "tova":
        return head_columns(attn, [T - 1], kv_head)
    importance = o.get("importance", "sum")
    weights = None
    if importance == "moving-average":
        decay = o.get("ema_decay", 0.9)
        weights = [(1 - decay) * decay ** (T - 1 - i) for i in range(T)]
    sums = head_columns(attn, rows, kv_head, weights)
    if importance == "mean":
        return [sums[j] / (T - j) for j in range(T)]
    if importance == "debiased":
        return [sums[j] / sum(1.0 / (i + 1) for i in range(j, T)) for j in range(T)]
    return sums


def kmeans_groups(features, anchors, protected, T, rounds=5):
    """Loop k-means on per-position feature vectors, seeded by (and keeping) the anchors."""
    centroids = [features[a].clone().double() for a in anchors]
    cluster = {}
    for _ in range(rounds):
        for t in range(T):
            if t in protected:
                continue
            if t in anchors:
                cluster[t] = anchors.index(t)
                continue
            dists = [float(((features[t].double() - c) ** 2).sum()) for c in centroids]
            cluster[t] = dists.index(min(dists))
        for c in range(len(anchors)):
            members = [t for t in cluster if cluster[t] == c]
            centroids[c] = torch.stack([features[t].double() for t in members]).mean(dim=0)
    return [t if t in protected else anchors[cluster[t]] for t in range(T)]


def prefill_groups(method, scores, T, budget, start_size, recent_ratio=0.5, features=None, spans=None, **o):
    """group[t] per the paper's rules (and the ablation options), by loops."""
    protected = protected_of(method, T, start_size, o.get("protect", "none"), o.get("protect_last", 8), spans)
    n_keep = exact_keep(budget, T, len(protected) + 1) if method != "full" else T
    if n_keep >= T:
        return list(range(T))
    if method == "local":
        recent = n_keep - len(protected)
        return [t if (t in protected or t >= T - recent) else -1 for t in range(T)]
    if method == "h2o":
        recent = min(n_keep - 1, int(n_keep * recent_ratio))
        older = sorted(range(T - recent), key=lambda t: -scores[t])[: n_keep - recent]
        return [t if (t >= T - recent or t in older) else -1 for t in range(T)]
    if method == "snapkv":
        w = min(o.get("window", 32), n_keep)
        older = sorted(range(T - w), key=lambda t: -scores[t])[: n_keep - w]
        return [t if (t >= T - w or t in older) else -1 for t in range(T)]
    if method == "tova":
        top = sorted(range(T), key=lambda t: -scores[t])[:n_keep]
        return [t if t in top else -1 for t in range(T)]
    if method == "h2o-ref":  # the reference code's selection, as written (kv_cache.py, H2OCache)
        forget = T - n_keep
        if forget == 1:
            candidates = list(range(min(start_size, T - 2), T - 1))
            victim = min(candidates, key=lambda t: scores[t])
            return [-1 if t == victim else t for t in range(T)]
        order = sorted(range(T - 1), key=lambda t: scores[t])  # argsort: token index of each rank
        kept = [r for r in range(T - 1) if order[r] > forget] + [T - 1]
        return [t if t in kept else -1 for t in range(T)]
    # elastic
    free = [t for t in range(T) if t not in protected]
    k = n_keep - len(protected)
    if o.get("importance", "sum") == "uniform":
        anchors = [free[int((i + 0.5) * len(free) / k)] for i in range(k)]
    else:
        anchors = sorted(sorted(free, key=lambda t: -scores[t])[:k])
    if o.get("prefill", "merge") == "evict":
        return [t if (t in protected or t in anchors) else -1 for t in range(T)]
    if o.get("prefill", "merge") == "kmeans":
        return kmeans_groups(features, anchors, protected, T)
    if o.get("prefill", "merge") == "similar":  # the anchor of the most cosine-similar key
        group = []
        for t in range(T):
            if t in protected or t in anchors:
                group.append(t)
                continue
            sims = [cosine(features[t], features[a]) for a in anchors]
            group.append(anchors[sims.index(max(sims))])
        return group
    group = []
    for t in range(T):
        if t in protected or t in anchors:
            group.append(t)
            continue
        best = None
        for a in anchors:  # ascending, so a tie keeps the earlier anchor
            if best is None or abs(a - t) < abs(best - t):
                best = a
        group.append(best)
    return group


PER_HEAD = {"snapkv": "each", "tova": "mean"}  # the per-head default of the peers


def run(model, input_ids, method, budget, max_new_tokens, start_size=1, distance=-25, recent_ratio=0.5,
        spans=None, prefill_inputs=None, **o):
    """Greedy generation with a hand-managed cache; returns tokens, per-layer records.

    Rows: one per KV head when the policy selects per head, else one for the whole layer
    (then every KV head holds the same positions). ``o`` holds the ablation / peer options;
    ``prefill_inputs`` go to the prefill forward only (a VLM's ``pixel_values``).
    """
    eager = eager_copy(model)
    KV_HEADS[0] = getattr(model.config, "text_config", model.config).num_key_value_heads
    per_head = o.get("scope") == "head" or o.get("heads", PER_HEAD.get(method)) == "each"
    G = KV_HEADS[0] if per_head else 1
    T = input_ids.shape[1]
    cache = DynamicCache()
    with torch.no_grad():
        out = eager(input_ids=input_ids, cache=cache, output_attentions=True, use_cache=True,
                    **(prefill_inputs or {}))
    n_layers = len(out.attentions)
    record = {"scores": [], "group": [], "kept": [], "evictions": [], "lengths": []}
    protected = protected_of(method, T, start_size, o.get("protect", "none"), o.get("protect_last", 8), spans)
    scoring = method in ("elastic", "h2o", "snapkv", "tova", "h2o-ref") and o.get("importance") != "uniform"
    all_scores = [[importance_scores(method, out.attentions[l], T, o, g if per_head else None) if scoring else None
                   for g in range(G)] for l in range(n_layers)]
    shared = o.get("scope") == "shared" or method == "h2o-ref"
    if shared and scoring:  # one score for all layers: their mean (uniform: no score to share)
        mean = [sum(all_scores[l][0][j] for l in range(n_layers)) / n_layers for j in range(T)]
        all_scores = [[mean] for _ in range(n_layers)]
    layers = []  # per layer, per row: {"pos": [...], "acc": [...], "k": [S entries [h, D]], "v": ...}
    for l in range(n_layers):
        keys, values = cache.layers[l].keys[0], cache.layers[l].values[0]  # [H_kv, T, D]
        h = KV_HEADS[0] // G
        rows = []
        for g in range(G):
            k_row, v_row = keys[g * h:(g + 1) * h], values[g * h:(g + 1) * h]
            features = k_row.permute(1, 0, 2).reshape(T, -1)
            scores = all_scores[l][g]
            group = prefill_groups(method, scores, T, budget, start_size, recent_ratio, features, spans, **o)
            kept = [t for t in range(T) if group[t] == t]
            rows.append({
                "pos": list(kept),
                "acc": ([scores[i] for i in range(len(kept))] if method == "h2o-ref"  # never re-indexed
                        else [scores[t] for t in kept] if scores is not None else [0.0] * len(kept)),
                "k": [k_row[:, [u for u in range(T) if group[u] == t]].mean(dim=1) for t in kept],
                "v": [v_row[:, [u for u in range(T) if group[u] == t]].mean(dim=1) for t in kept],
                "scores": scores, "group": group, "kept": kept,
            })
        layers.append(rows)
        record["scores"].append([r["scores"] for r in rows] if per_head else rows[0]["scores"])
        record["group"].append([r["group"] for r in rows] if per_head else rows[0]["group"])
        record["kept"].append([r["kept"] for r in rows] if per_head else rows[0]["kept"])

    def store(l):
        rows = layers[l]
        cache.layers[l].keys = torch.cat([torch.stack(r["k"], dim=1) for r in rows])[None]
        cache.layers[l].values = torch.cat([torch.stack(r["v"], dim=1) for r in rows])[None]

    for l in range(n_layers):
        store(l)
    record["lengths"].append(len(layers[0][0]["pos"]))
    prompt_entries = len(layers[0][0]["pos"])
    decode = o.get("decode", "fixed-point")
    tokens = [int(out.logits[0, -1].argmax())]
    for step in range(1, max_new_tokens):
        position = T + step - 1
        with torch.no_grad():
            # The reference code's protocol feeds the token at the compressed cache's length.
            fed_at = len(layers[0][0]["pos"]) if o.get("positions") == "compressed" else position
            out = eager(input_ids=torch.tensor([[tokens[-1]]]), position_ids=torch.tensor([[fed_at]]),
                        cache=cache, output_attentions=True, use_cache=True)
        capacity = exact_keep(budget, T + step, len(protected) + 1) if method != "full" else T + step
        shared_received = None
        if shared:
            per_layer = [head_columns(out.attentions[l], [0]) for l in range(n_layers)]
            shared_received = [sum(r[j] for r in per_layer) / n_layers for j in range(len(per_layer[0]))]
        for l in range(n_layers):
            new_k, new_v = cache.layers[l].keys[0, :, -1], cache.layers[l].values[0, :, -1]  # [H_kv, D]
            for g, row in enumerate(layers[l]):
                h = KV_HEADS[0] // G
                pos, acc = row["pos"], row["acc"]
                pos.append(position)
                row["k"].append(new_k[g * h:(g + 1) * h])
                row["v"].append(new_v[g * h:(g + 1) * h])
                received = shared_received or head_columns(out.attentions[l], [0], g if per_head else None)
                if method in ("snapkv", "tova"):
                    acc[:] = received
                else:
                    acc.append(0.0)
                    for j in range(len(acc)):
                        acc[j] += received[j]
                while len(pos) > capacity:
                    if method == "elastic" and decode == "recent":
                        victim = len(pos) - 1
                    elif method == "elastic" and decode == "lowest-frequency":
                        allowed = [i for i in range(len(pos)) if pos[i] >= min(start_size, T)]
                        victim = min(allowed, key=lambda i: (acc[i], pos[i]))
                    elif method == "elastic":
                        victim = min(max(min(start_size, T), prompt_entries + distance), len(pos) - 1)
                    elif method == "local":
                        victim = min(start_size, T)
                    elif method == "h2o-ref":  # lowest score in slots start_size .. S - 2
                        first = min(start_size, len(pos) - 2)  # sinks cover all but the newest: the one before it
                        victim = min(range(first, len(pos) - 1), key=lambda i: acc[i])
                    elif method in ("snapkv", "tova"):
                        victim = min(range(len(pos)), key=lambda i: (acc[i], pos[i]))
                    else:  # h2o
                        recent = min(capacity - 1, int(capacity * recent_ratio))
                        older = acc[: len(pos) - recent]
                        victim = older.index(min(older))
                    record["evictions"].append((step, l, g, pos[victim]) if per_head else (step, l, pos[victim]))
                    for name in ("pos", "acc", "k", "v"):
                        del row[name][victim]
            store(l)
        record["lengths"].append(len(layers[0][0]["pos"]))
        tokens.append(int(out.logits[0, -1].argmax()))
    record["keys"] = [layer.keys for layer in cache.layers]
    record["values"] = [layer.values for layer in cache.layers]
    return tokens, record


# ---------------------------------------------------------------- per-layer budgets, LOOK-M
#
# PrefixKV, VL-Cache and LOOK-M, batch >= 1, by loops. The layers' budgets: PrefixKV's
# shared threshold by a greedy loop (the next entry of the layer whose mass reached so far
# is the smallest), VL-Cache's clamp-and-renormalise by the classic iteration.

def exact_layer_keep(kept: int, prompt_length: int, tokens: int, minimum: int) -> int:
    """A layer that kept ``kept`` of ``prompt_length`` holds ratio kept / T: its capacity."""
    return min(tokens, max(minimum, math.ceil(Fraction(kept, prompt_length) * tokens)))


def exact_total(budget: float, layers: int, T: int, minimum: int) -> int:
    return min(layers * T, max(layers * minimum, math.ceil(Fraction(str(budget)) * layers * T)))


def greedy_mass_counts(masses, total, minimum, forced):
    """Add entries one at a time to the layer whose next entry has the least mass before it."""
    order = [sorted(m, reverse=True) for m in masses]
    sums = [sum(o) or 1.0 for o in order]
    counts = [forced + min(max(0, minimum - forced), len(o)) for o in order]
    taken = [c - forced for c in counts]
    while sum(counts) < total:
        best = None
        for l, o in enumerate(order):
            if taken[l] < len(o):
                before = sum(o[: taken[l]]) / sums[l]
                if best is None or before < best[0] - 1e-12:
                    best = (before, l)
        counts[best[1]] += 1
        taken[best[1]] += 1
    return counts


def renormalised_counts(total, weights, lo, hi):
    """Shares ``clamp(c * w_l, lo, hi)`` summing to ``total``, in exact fractions: walk the
    breakpoints of the piecewise-linear ``f(c) = sum_l clamp(c * w_l, lo, hi)`` to the
    segment where it reaches ``total`` and solve it; then largest remainder (ties to the
    earlier layer, never above ``hi``)."""
    n = len(weights)
    w = [Fraction(max(0.0, float(x))) for x in weights]
    if sum(w) == 0:
        w = [Fraction(1)] * n
    total = min(max(total, n * lo), n * hi)

    def f(c):
        return sum(min(Fraction(hi), max(Fraction(lo), c * x)) for x in w)

    points = sorted({Fraction(0)} | {Fraction(b) / x for x in w if x > 0 for b in (lo, hi)})
    c = points[-1]
    for a, b in zip(points, points[1:]):
        if f(b) >= total:  # f is linear on [a, b]: solve f(c) = total there
            c = a if f(b) == f(a) else a + (b - a) * (total - f(a)) / (f(b) - f(a))
            break
    exact = [min(Fraction(hi), max(Fraction(lo), c * x)) for x in w]
    counts = [math.floor(x) for x in exact]
    for l in sorted(range(n), key=lambda l: (-(exact[l] - counts[l]), l)):
        if sum(counts) < total and counts[l] < hi:
            counts[l] += 1
    return counts


def sparsity(attn, rows, threshold=0.01):
    """attn [1, H, q, S]: share of each row's visible weights below threshold x its max, mean."""
    H = attn.shape[1]
    shares = []
    for h in range(H):
        for i in rows:
            visible = [float(attn[0, h, i, j]) for j in range(i + 1)]
            top = max(visible)
            shares.append(sum(1 for v in visible if v < threshold * top) / len(visible))
    return sum(shares) / len(shares)


def cosine(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm().clamp(min=1e-12) * b.norm().clamp(min=1e-12)))


def _naive_eager(module, query, key, value, attention_mask, **kwargs):
    """Eager attention that drops the one-query mask when this layer holds another length
    (its mask was built for layer 0; the cache holds no padding)."""
    import sys
    if attention_mask is not None and query.shape[-2] == 1 and attention_mask.shape[-1] != key.shape[-2]:
        attention_mask = None
    return sys.modules[type(module).__module__].eager_attention_forward(module, query, key, value,
                                                                       attention_mask, **kwargs)


def _eager_any_length(model):
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    AttentionInterface.register("naive_eager", _naive_eager)
    AttentionMaskInterface.register("naive_eager", ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("naive_eager")
    return eager


LAYERED_START = {"prefixkv": 4, "vlcache": 1, "lookm": 1}


def run_layered(model, input_ids, method, budget, max_new_tokens, start_size=None, distance=-25,
                spans=None, prefill_inputs=None, **o):
    """Greedy generation (batch B) with PrefixKV, VL-Cache or LOOK-M, by hand.

    Returns ``(tokens [B][n], record)``; the record holds per sample, per layer (per KV
    head for LOOK-M) the scores, groups and kept positions, ``counts`` (entries each layer
    kept after the prefill), ``lengths`` (``[forwards][layers]``), the evictions
    ``(step, layer, row, position)`` and the final K/V.
    """
    spans = spans or {}
    eager = _eager_any_length(model)
    config = getattr(model.config, "text_config", model.config)
    H_kv = config.num_key_value_heads
    B, T = input_ids.shape
    start = LAYERED_START[method] if start_size is None else start_size
    cache = DynamicCache()
    with torch.no_grad():
        out = eager(input_ids=input_ids, cache=cache, output_attentions=True, use_cache=True,
                    **(prefill_inputs or {}))
    L = len(out.attentions)
    KV_HEADS[0] = H_kv
    protected = (sorted(set(range(min(start, T))) | ({T - 1} if T - 1 >= min(start, T) else set()))
                 if method == "prefixkv" else [])
    minimum = len(protected) + 1
    G = H_kv if (method == "lookm" and o.get("heads", "each") == "each") else 1
    image = spans.get("image")
    # -- scores: scores[b][l][g]
    if method == "vlcache":
        first = image[1] if image and image[1] < T else max(0, T - o.get("window", 32))
        voters = list(range(first, T))
    else:
        voters = list(range(T))
    scores = [[[head_columns(out.attentions[l][b:b + 1], voters, g if G > 1 else None) for g in range(G)]
               for l in range(L)] for b in range(B)]
    # -- the layers' budgets
    total = exact_total(budget, L, T, minimum)
    if method == "prefixkv" and o.get("ratios") is not None:  # calibrated shares
        counts = renormalised_counts(total, list(o["ratios"]), minimum, T)
    elif method == "prefixkv":
        free = [t for t in range(T) if t not in protected]
        masses = [[sum(scores[b][l][0][t] for b in range(B)) / B for t in free] for l in range(L)]
        counts = greedy_mass_counts(masses, total, minimum, len(protected))
    elif method == "vlcache":
        dens = [1 - sum(sparsity(out.attentions[l][b:b + 1], voters, o.get("threshold", 0.01))
                        for b in range(B)) / B for l in range(L)]
        lo = min(T, max(minimum, math.ceil(o.get("min_ratio", 0.01) * T)))
        counts = renormalised_counts(total, dens, lo, T)
    else:
        counts = [exact_keep(budget, T, minimum)] * L
    record = {"counts": counts, "scores": [], "group": [], "kept": [], "evictions": [], "lengths": []}

    def recent_of(capacity, ratio):
        return min(capacity - 1, int(capacity * ratio))

    rows = {}  # (b, l, g) -> {"pos", "acc", "k", "v"}
    for b in range(B):
        rec_s, rec_g, rec_k = [], [], []
        for l in range(L):
            keys, values = cache.layers[l].keys[b], cache.layers[l].values[b]  # [H_kv, T, D]
            h = H_kv // G
            per_s, per_g, per_k = [], [], []
            for g in range(G):
                k_row, v_row = keys[g * h:(g + 1) * h], values[g * h:(g + 1) * h]
                s, n_keep = scores[b][l][g], counts[l]
                if n_keep >= T:
                    group = list(range(T))
                elif method == "prefixkv":
                    best = sorted((t for t in range(T) if t not in protected), key=lambda t: -s[t])
                    keep = set(protected) | set(best[: n_keep - len(protected)])
                    group = [t if t in keep else -1 for t in range(T)]
                elif method == "vlcache":
                    recent = recent_of(n_keep, o.get("recent_ratio", 0.1))
                    best = sorted(range(T - recent), key=lambda t: -s[t])[: n_keep - recent]
                    group = [t if (t >= T - recent or t in best) else -1 for t in range(T)]
                else:  # lookm
                    recent = recent_of(n_keep, o.get("recent_ratio", 0.5))
                    prior = image is not None and o.get("text_prior", True)
                    is_image = (lambda t: prior and image[0] <= t < image[1])
                    best = sorted(range(T - recent), key=lambda t: (is_image(t), -s[t], t))[: n_keep - recent]
                    kept = sorted(set(best) | set(range(T - recent, T)))
                    group = []
                    for t in range(T):
                        if t in kept:
                            group.append(t)
                        elif o.get("merge", "pivot") == "evict":
                            group.append(-1)
                        else:
                            sims = [cosine(k_row[:, t], k_row[:, a]) for a in kept]
                            group.append(kept[sims.index(max(sims))])  # index(): the first maximum
                kept = [t for t in range(T) if group[t] == t]
                rows[b, l, g] = {
                    "pos": list(kept),
                    "acc": [s[t] for t in kept],
                    "k": [k_row[:, [u for u in range(T) if group[u] == t]].mean(dim=1) for t in kept],
                    "v": [v_row[:, [u for u in range(T) if group[u] == t]].mean(dim=1) for t in kept],
                    "entries": len(kept),
                }
                per_s.append(s), per_g.append(group), per_k.append(kept)
            pick = (lambda x: x) if G > 1 else (lambda x: x[0])
            rec_s.append(pick(per_s)), rec_g.append(pick(per_g)), rec_k.append(pick(per_k))
        record["scores"].append(rec_s), record["group"].append(rec_g), record["kept"].append(rec_k)

    def store(l):
        h = H_kv // G
        cache.layers[l].keys = torch.stack([torch.cat([torch.stack(rows[b, l, g]["k"], dim=1) for g in range(G)])
                                            for b in range(B)])
        cache.layers[l].values = torch.stack([torch.cat([torch.stack(rows[b, l, g]["v"], dim=1) for g in range(G)])
                                              for b in range(B)])
        assert cache.layers[l].keys.shape[1] == G * h

    for l in range(L):
        store(l)
    record["lengths"].append([len(rows[0, l, 0]["pos"]) for l in range(L)])
    tokens = [[int(out.logits[b, -1].argmax())] for b in range(B)]
    for step in range(1, max_new_tokens):
        position = T + step - 1
        with torch.no_grad():
            out = eager(input_ids=torch.tensor([[t[-1]] for t in tokens]),
                        position_ids=torch.full((B, 1), position), cache=cache, output_attentions=True,
                        use_cache=True)
        for l in range(L):
            if method == "lookm":
                capacity = exact_keep(budget, T + step, minimum)
            else:
                capacity = exact_layer_keep(counts[l], T, T + step, minimum)
            new_k, new_v = cache.layers[l].keys[:, :, -1], cache.layers[l].values[:, :, -1]  # [B, H_kv, D]
            for b in range(B):
                for g in range(G):
                    h = H_kv // G
                    row = rows[b, l, g]
                    pos, acc = row["pos"], row["acc"]
                    pos.append(position)
                    row["k"].append(new_k[b, g * h:(g + 1) * h])
                    row["v"].append(new_v[b, g * h:(g + 1) * h])
                    received = head_columns(out.attentions[l][b:b + 1], [0], g if G > 1 else None)
                    if method == "vlcache":
                        acc[:] = received
                    else:
                        acc.append(0.0)
                        for j in range(len(acc)):
                            acc[j] += received[j]
                    while len(pos) > capacity:
                        if method == "prefixkv":
                            victim = min(max(min(start, T), row["entries"] + distance), len(pos) - 1)
                        elif method == "vlcache":
                            victim = min(range(len(pos)), key=lambda i: (acc[i], pos[i]))
                        else:
                            recent = recent_of(capacity, o.get("recent_ratio", 0.5))
                            older = acc[: len(pos) - recent]
                            victim = older.index(min(older))
                        record["evictions"].append((step, b, l, g, pos[victim]))
                        for name in ("pos", "acc", "k", "v"):
                            del row[name][victim]
            store(l)
        record["lengths"].append([len(rows[0, l, 0]["pos"]) for l in range(L)])
        for b in range(B):
            tokens[b].append(int(out.logits[b, -1].argmax()))
    record["keys"] = [layer.keys for layer in cache.layers]
    record["values"] = [layer.values for layer in cache.layers]
    return tokens, record
