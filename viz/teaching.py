"""'How it works': a short classroom text filled with the numbers of the current prompt."""

from __future__ import annotations

import html

import numpy as np

from .style import method_name, token_text

_OTHER_METHODS = {
    "full": "The full cache keeps every entry: nothing is scored, merged or evicted. Pick "
            "<b>elastic</b> to see merging on this prompt.",
    "h2o": "H2O keeps the tokens with the most accumulated attention plus a recent window and "
           "<i>drops</i> the rest (no merging); it keeps re-scoring while decoding and evicts the "
           "lowest score. Pick <b>elastic</b> to compare.",
    "local": "Local (StreamingLLM) keeps the first token(s) and the most recent ones, whatever they "
             "say. Pick <b>elastic</b> to compare.",
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
    p.append(
        f"<p><b>1. Scoring (prefill).</b> Reading the prompt ({T} tokens: "
        f"{_count_types(trace, range(T))}), every layer measures how much attention each token "
        "receives from the whole prompt. That is the <i>attention frequency</i> heatmap."
        + ("" if top is None else
           f" In layer {layer} the most attended token is position {top} '{token_text(trace, top)}' "
           f"({trace.token_type(top)}).")
        + "</p>")
    if trace.method != "elastic":
        p.append(f"<p><b>This answer used {html.escape(method_name(trace.method))}.</b> "
                 f"{_OTHER_METHODS.get(trace.method, '')} In layer {layer} it kept {len(kept)} of {T} prompt "
                 f"entries and removed {len(evictions)} while decoding.</p>")
        return "\n".join(p)
    p.append(
        f"<p><b>2. Anchors.</b> The budget &gamma; = {trace.budget:g} lets each layer keep "
        f"&lceil;&gamma;&middot;T&rceil; = {len(kept)} entries: {len(protected)} protected "
        f"({_sinks(trace.start_size)} plus the last prompt token) and the "
        f"{len(anchors)} highest-scoring tokens, the <i>anchors</i> (layer {layer}: "
        f"{_count_types(trace, anchors)}). Each layer picks its own anchors.</p>")
    group_text = ""
    if biggest is not None:
        members = np.flatnonzero(lt.group == biggest)
        group_text = (f" In layer {layer} the biggest group, around anchor {biggest} "
                      f"'{token_text(trace, biggest)}', holds {len(members)} tokens "
                      f"(positions {members.min()}&ndash;{members.max()}).")
    p.append(
        "<p><b>3. Merging keeps context.</b> Every other token joins its nearest anchor by position, "
        "and the anchor's key and value become the plain average of its group. Nothing is simply "
        f"thrown away: {len(lt.merged)} merged tokens still speak through their anchors." + group_text + "</p>")
    span = (trace.spans or {}).get("instruction")
    if span is not None and span[1] > span[0]:
        merged_instruction = int(np.isin(lt.merged, np.arange(*span)).sum())
        p.append(
            f"<p><b>Watch the instruction.</b> A token's score sums the attention of every query "
            "<i>after</i> it, so the last tokens of the prompt, usually your question, are seen by few "
            f"queries and score lowest. Here {merged_instruction} of the {span[1] - span[0]} instruction "
            f"tokens were merged in layer {layer}. A large model copes; a tiny one may answer a different "
            "question (compare with the full cache).</p>")
    steps = trace.decode_steps
    p.append(
        "<p><b>4. Fixed-point elimination (decoding).</b> While the answer grows, the cache may hold "
        "&lceil;&gamma; &times; tokens seen&rceil; entries. Beyond that, one entry is deleted at a fixed "
        f"slot N<sub>tl</sub> = compressed prompt ({len(kept)}) + distance ({trace.distance}) = "
        f"{trace.fixed_point}. Slots before N<sub>tl</sub> (the compressed prompt head) stay forever; "
        "behind it a window of the most recent tokens slides along. "
        f"Here: {len(evictions)} deletions over {steps} decoding steps. Move the step slider to replay them.</p>")
    return "\n".join(p)
