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


def protected_of(method, T, start_size):
    sinks = list(range(min(start_size, T)))
    if method == "elastic":
        return sinks + ([T - 1] if T - 1 >= len(sinks) else [])
    if method == "local":
        return sinks
    return []


def prefill_groups(method, scores, T, budget, start_size, recent_ratio=0.5):
    """group[t] per the paper's rules, by loops."""
    protected = protected_of(method, T, start_size)
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
    # elastic
    candidates = sorted((t for t in range(T) if t not in protected), key=lambda t: -scores[t])
    anchors = sorted(candidates[: n_keep - len(protected)])
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


def run(model, input_ids, method, budget, max_new_tokens, start_size=1, distance=-25, recent_ratio=0.5):
    """Greedy generation with a hand-managed cache; returns tokens, per-layer records."""
    eager = eager_copy(model)
    T = input_ids.shape[1]
    cache = DynamicCache()
    with torch.no_grad():
        out = eager(input_ids=input_ids, cache=cache, output_attentions=True, use_cache=True)
    n_layers = len(out.attentions)
    record = {"scores": [], "group": [], "kept": [], "evictions": [], "lengths": []}
    layers_pos, layers_acc = [], []
    protected = protected_of(method, T, start_size)
    for l in range(n_layers):
        scores = column_sums(out.attentions[l])
        group = prefill_groups(method, scores, T, budget, start_size, recent_ratio)
        kept = [t for t in range(T) if group[t] == t]
        layer = cache.layers[l]
        keys, values = layer.keys.clone(), layer.values.clone()
        new_k = torch.stack([keys[:, :, [u for u in range(T) if group[u] == t], :].mean(dim=2) for t in kept], dim=2)
        new_v = torch.stack([values[:, :, [u for u in range(T) if group[u] == t], :].mean(dim=2) for t in kept], dim=2)
        layer.keys, layer.values = new_k, new_v
        record["scores"].append(scores)
        record["group"].append(group)
        record["kept"].append(kept)
        layers_pos.append(list(kept))
        layers_acc.append([scores[t] for t in kept])
    record["lengths"].append(len(layers_pos[0]))
    prompt_entries = len(layers_pos[0])
    tokens = [int(out.logits[0, -1].argmax())]
    for step in range(1, max_new_tokens):
        position = T + step - 1
        with torch.no_grad():
            out = eager(input_ids=torch.tensor([[tokens[-1]]]), position_ids=torch.tensor([[position]]),
                        cache=cache, output_attentions=True, use_cache=True)
        capacity = exact_keep(budget, T + step, len(protected) + 1) if method != "full" else T + step
        for l in range(n_layers):
            layer = cache.layers[l]
            pos, acc = layers_pos[l], layers_acc[l]
            pos.append(position)
            received = column_sums(out.attentions[l])
            acc.append(0.0)
            for j in range(len(acc)):
                acc[j] += received[j]
            while len(pos) > capacity:
                if method == "elastic":
                    victim = min(max(start_size, prompt_entries + distance), len(pos) - 1)
                elif method == "local":
                    victim = start_size
                else:  # h2o
                    recent = min(capacity - 1, int(capacity * recent_ratio))
                    older = acc[: len(pos) - recent]
                    victim = older.index(min(older))
                record["evictions"].append((step, l, pos[victim]))
                keep = [i for i in range(len(pos)) if i != victim]
                layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]
                del pos[victim], acc[victim]
        record["lengths"].append(len(layers_pos[0]))
        tokens.append(int(out.logits[0, -1].argmax()))
    record["keys"] = [layer.keys for layer in cache.layers]
    record["values"] = [layer.values for layer in cache.layers]
    return tokens, record
