"""'How it works': a short classroom text filled with the numbers of the current prompt."""

from __future__ import annotations

import html

import numpy as np

from .style import kept_after_prefill, method_name, token_text, variant_text

_OTHER_METHODS = {
    "full": "The full cache keeps every entry: nothing is scored, merged or evicted. Pick "
            "<b>elastic</b> to see merging on this prompt.",
    "h2o": "H2O keeps the tokens with the most accumulated attention plus a recent window and "
           "<i>drops</i> the rest (no merging); it keeps re-scoring while decoding and evicts the "
           "lowest score. Pick <b>elastic</b> to compare.",
    "local": "Local (StreamingLLM) keeps the first token(s) and the most recent ones, whatever they "
             "say. Pick <b>elastic</b> to compare.",
    "snapkv": "SnapKV lets the last prompt tokens (the observation window, usually your question) vote: "
              "the entries they attend to most are kept, each KV head choosing its own, and the rest are "
              "dropped. While decoding it drops the entry the newest token attends to least.",
    "tova": "TOVA keeps the entries the newest token attends to most, and re-decides at every step: "
            "the entry the newest token attends to least is dropped.",
    "prefixkv": "PrefixKV scores the tokens as H2O does (attention received), but does not give every layer "
                "the same budget. One threshold on the share of its attention a layer's best tokens hold is "
                "shared by all layers: a layer whose attention is concentrated on a few tokens reaches it with few "
                "entries and hands the rest of its budget to layers whose attention is spread out. All layers "
                "together keep what the uniform budget allows. The rest is evicted; while decoding each layer "
                "keeps its own share and evicts at a fixed slot, as Elastic Cache does.",
    "vlcache": "VL-Cache lets the text after the image vote: those tokens' attention scores every entry. A layer "
               "whose attention is <i>sparse</i> (most weights below 1% of the largest) needs fewer entries, so "
               "the budget is spread over the layers by how dense their attention is; all layers together keep "
               "what the uniform budget allows. Each layer keeps its best-scored entries plus a short recent "
               "window (10% of its budget) and drops the rest.",
    "lookm": "LOOK-M ranks text tokens before image tokens (a <i>text prior</i>), keeps the best-ranked ones "
             "plus a recent window, each KV head choosing its own, and does not throw the others away: each is "
             "averaged into the kept entry whose <i>key is most similar</i>, wherever it sits in the prompt "
             "(Elastic Cache merges into the nearest anchor by position). While decoding it evicts as H2O does.",
    "h2o-ref": "This is H2O as the paper's reference code runs it: one score shared by all layers, no "
               "recent window, and a selection that keeps <i>rank positions</i> instead of the "
               "highest-scoring tokens, so the kept set is close to random. It is the baseline of the "
               "paper's tables; pick <b>h2o</b> for textbook H2O.",
}
_PREFILL = {
    "merge": "Every other token joins its nearest anchor by position, and the anchor's key and value become "
             "the plain average of its group. Nothing is simply thrown away",
    "kmeans": "Every other token joins the anchor whose key is most similar (k-means on the keys, seeded by the "
              "anchors), and the anchor's key and value become the plain average of its group. Nothing is "
              "simply thrown away",
    "similar": "Every other token joins the anchor whose key is the most similar (cosine similarity), wherever it "
               "sits in the prompt (LOOK-M's merge rule), and the anchor's key and value become the plain average "
               "of its group. Nothing is simply thrown away",
    "evict": "This variant <i>evicts</i> every other token instead of merging it (the paper's 'eviction' "
             "ablation)",
}
_IMPORTANCE = {
    "sum": "the highest-scoring tokens",
    "mean": "the tokens with the highest <i>mean</i> attention (the sum divided by the queries that see them)",
    "moving-average": "the tokens with the highest moving average of attention (recent queries weigh most)",
    "debiased": "the tokens that receive more attention than uniform attention would give their position",
    "uniform": "tokens evenly spaced over the prompt (no score at all: a control)",
}


def _sinks(n: int) -> str:
    return "no attention sink" if n == 0 else "the attention sink (first token)" if n == 1 else (
        f"{n} attention sinks (the first {n} tokens)")


def _count_types(trace, positions) -> str:
    names = [trace.token_type(int(p)) for p in positions]
    kinds, counts = np.unique(names, return_counts=True)
    return ", ".join(f"{c} {k}" for k, c in zip(kinds.tolist(), counts.tolist())) or "none"


def explain_html(trace, layer: int = 0) -> str:
    """Explain prefill merging and fixed-point elimination with ``trace``'s own numbers.

    Parameters
    ----------
    trace : elastic.Trace or None
        The trace of the last answer (None: the text without numbers).
    layer : int
        The layer the figures show.

    Returns
    -------
    str
        HTML, a few short paragraphs.
    """
    if trace is None:
        return ("<p>Send a message (or load an example) and this section explains what the cache did "
                "with <i>your</i> prompt, using the figures above.</p>")
    lt = trace.layers[layer]
    T, kept = trace.prompt_length, lt.kept
    protected = np.asarray(trace.protected)
    anchors = kept[~np.isin(kept, protected)]
    sizes = lt.group_sizes()
    biggest = max(anchors.tolist(), key=lambda a: sizes.get(a, 1), default=None)
    evictions = trace.evictions_of(layer)
    scores = lt.scores
    top = None if scores is None else int(np.argmax(scores))
    p = []
    if scores is None:
        p.append(f"<p><b>1. No scoring.</b> The prompt has {T} tokens ({_count_types(trace, range(T))}). "
                 f"{html.escape(method_name(trace.method))} does not measure attention, so the heatmap "
                 "is empty.</p>")
    else:
        p.append(
            f"<p><b>1. Scoring (prefill).</b> Reading the prompt ({T} tokens: "
            f"{_count_types(trace, range(T))}), every layer measures how much attention each token "
            "receives. That is the <i>attention frequency</i> heatmap."
            f" In layer {layer} the most attended token is position {top} '{token_text(trace, top)}' "
            f"({trace.token_type(top)}).</p>")
    if trace.method != "elastic":
        p.append(f"<p><b>This answer used {html.escape(method_name(trace.method))}.</b> "
                 f"{_OTHER_METHODS.get(trace.method, '')} In layer {layer} it kept {len(kept)} of {T} prompt "
                 f"entries and removed {len(evictions)} while decoding.</p>")
        if trace.budgets_per_layer:
            counts = kept_after_prefill(trace)
            own = trace.budget if lt.budget is None else lt.budget
            p.append(f"<p><b>A budget per layer.</b> Layer {layer}'s own budget is {own:.3f} of the prompt "
                     f"({len(kept)} entries; the budget {trace.budget:g} alone would give every layer "
                     f"{trace.budget_entries}). Over the {trace.num_layers} layers the prefill kept "
                     f"{min(counts)} to {max(counts)} entries, {sum(counts)} in all. The "
                     "<i>Budget per layer</i> figure shows every layer.</p>")
        return "\n".join(p)
    options = {"importance": "sum", "prefill": "merge", "decode": "fixed-point", "protect": "none",
               "scope": "layer", **(trace.options or {})}
    if trace.variant:
        p.append(f"<p><b>Ablation.</b> This run changed the paper's method: "
                 f"{html.escape(variant_text(trace))}.</p>")
    extra = {"instruction": ", the instruction", "last": f", the last {options.get('protect_last')} prompt tokens"}
    who = {"layer": "Each layer picks its own anchors.", "shared": "All layers share one score, so one set of anchors.",
           "head": f"Each KV head picks its own anchors (this is KV head {trace.head})."}[options["scope"]]
    if trace.budget_entries is not None and trace.budget_entries < len(kept):
        allowance = (f"&lceil;&gamma;&middot;T&rceil; = {trace.budget_entries} entries, raised to the "
                     f"minimum of {len(kept)} this method needs (its protected tokens plus one anchor)")
    else:
        allowance = f"&lceil;&gamma;&middot;T&rceil; = {len(kept)} entries"
    p.append(
        f"<p><b>2. Anchors.</b> The budget &gamma; = {trace.budget:g} lets each layer keep "
        f"{allowance}: {len(protected)} protected "
        f"({_sinks(trace.start_size)}{extra.get(options['protect'], '')} plus the last prompt token) and "
        f"{len(anchors)} of {_IMPORTANCE[options['importance']]}, the <i>anchors</i> (layer {layer}: "
        f"{_count_types(trace, anchors)}). {who}</p>")
    group_text = ""
    if biggest is not None:
        members = np.flatnonzero(lt.group == biggest)
        group_text = (f" In layer {layer} the biggest group, around anchor {biggest} "
                      f"'{token_text(trace, biggest)}', holds {len(members)} tokens "
                      f"(positions {members.min()}&ndash;{members.max()}).")
    if options["prefill"] == "evict":
        p.append(f"<p><b>3. Eviction.</b> {_PREFILL['evict']}: {len(lt.evicted)} prompt tokens are gone.</p>")
    else:
        p.append(f"<p><b>3. Merging keeps context.</b> {_PREFILL[options['prefill']]}: {len(lt.merged)} merged "
                 "tokens still speak through their anchors." + group_text + "</p>")
    span = (trace.spans or {}).get("instruction")
    if span is not None and span[1] > span[0] and options["protect"] == "instruction":
        p.append(f"<p><b>The instruction is protected.</b> Its {span[1] - span[0]} tokens are kept as they are "
                 "(this variant's choice): the question survives whatever the scores say.</p>")
    elif span is not None and span[1] > span[0]:
        merged_instruction = int(np.isin(lt.merged, np.arange(*span)).sum())
        p.append(
            f"<p><b>Watch the instruction.</b> A token's score sums the attention of every query "
            "<i>after</i> it, so the last tokens of the prompt, usually your question, are seen by few "
            f"queries and score lowest. Here {merged_instruction} of the {span[1] - span[0]} instruction "
            f"tokens were merged in layer {layer}. A large model copes; a tiny one may answer a different "
            "question (compare with the full cache).</p>")
    steps = trace.decode_steps
    if options["decode"] != "fixed-point":
        rule = ("the newest entry" if options["decode"] == "recent" else
                "the entry with the least attention accumulated since the prefill (sinks excepted)")
        p.append(
            "<p><b>4. Eviction while decoding.</b> While the answer grows, the cache may hold "
            f"&lceil;&gamma; &times; tokens seen&rceil; entries. Beyond that this variant deletes {rule}, "
            f"instead of the paper's fixed point. Here: {len(evictions)} deletions over {steps} decoding steps.</p>")
        return "\n".join(p)
    raw = len(kept) + trace.distance
    where = "before the first slot" if trace.start_size == 0 else f"inside {_sinks(trace.start_size)}"
    clamp = "" if raw == trace.fixed_point else f", which would fall {where}, so it is clamped to {trace.fixed_point}"
    p.append(
        "<p><b>4. Fixed-point elimination (decoding).</b> While the answer grows, the cache may hold "
        "&lceil;&gamma; &times; tokens seen&rceil; entries. Beyond that, one entry is deleted at a fixed "
        f"slot N<sub>tl</sub> = compressed prompt ({len(kept)}) + distance ({trace.distance}) = "
        f"{raw}{clamp}. Slots before N<sub>tl</sub> (the compressed prompt head) stay forever; "
        "behind it a window of the most recent tokens slides along. "
        f"Here: {len(evictions)} deletions over {steps} decoding steps. Move the step slider to replay them.</p>")
    return "\n".join(p)
