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
    if shared:  # one score for all layers: their mean
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
