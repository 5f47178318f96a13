"""Answers side by side: a word-by-word diff against the full-cache answer, and metrics.

ROUGE-L itself is computed by the caller with ``elastic.rouge_l`` (the project's one
implementation of the paper's metric) and passed in, so viz imports no model code.
"""

from __future__ import annotations

import difflib
import html
import math

from .style import entries_text, human_bytes, method_name, variant_text


# Explicit text colours: readable on light and dark page backgrounds alike.
CHANGED = "background:#ffd166;color:#1a1a1a;padding:0 2px;border-radius:2px"
MISSING = "color:#e0464f;text-decoration:line-through"


def diff_tokens(reference: str, candidate: str) -> list[tuple[str, str]]:
    """Word-level diff of ``candidate`` against ``reference``.

    Returns
    -------
    list of (kind, word)
        ``kind`` is ``same``, ``changed`` (in the candidate, not in the reference) or
        ``missing`` (in the reference, not in the candidate), in reading order.
    """
    ref, cand = reference.split(), candidate.split()
    out: list[tuple[str, str]] = []
    matcher = difflib.SequenceMatcher(a=ref, b=cand, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            out += [("same", w) for w in cand[j1:j2]]
            continue
        out += [("missing", w) for w in ref[i1:i2]]
        out += [("changed", w) for w in cand[j1:j2]]
    return out


def diff_html(reference: str, candidate: str) -> str:
    """``candidate`` as HTML with its differences from ``reference`` highlighted word by word."""
    parts = []
    for kind, word in diff_tokens(reference, candidate):
        w = html.escape(word)
        if kind == "same":
            parts.append(w)
        elif kind == "changed":
            parts.append(f'<mark class="ec-changed" style="{CHANGED}">{w}</mark>')
        else:
            parts.append(f'<del class="ec-missing" style="{MISSING}">{w}</del>')
    return " ".join(parts)


def _number(value) -> float | None:
    """``value`` as a float, None if missing or NaN (one new token has no decode speed)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def compare_html(results: list[dict], budget: float | None = None) -> str:
    """A side-by-side table of answers and metrics.

    Parameters
    ----------
    results : list of dict
        One per method, in display order, each with ``method``, ``text``, ``stats``
        (``prefill_s``, ``decode_s``, ``tokens_per_s``, ``kv_bytes``, ``full_kv_bytes``) and
        optionally ``rouge_l`` (F1 against the full answer); the ``full`` entry, when
        present, is the reference for the highlighting.
    budget : float, optional
        Shown in the caption.

    Returns
    -------
    str
        HTML: one column per method with the answer as written, its differences to the
        full answer behind a toggle, ROUGE-L against full, time, tokens/s (from the median
        decode step when the stats have it) and KV bytes.
    """
    reference = next((r["text"] for r in results if r["method"] == "full"), None)
    cols = []
    for r in results:
        stats = r.get("stats") or {}
        is_ref = r["method"] == "full" or reference is None
        answer = html.escape(r["text"])
        if not is_ref and r["text"] != reference:
            answer += ("<details class='ec-diff' style='margin-top:6px'><summary style='cursor:pointer'>"
                       f"Differences from the full answer</summary>{diff_html(reference, r['text'])}</details>")
        score = "reference" if r["method"] == "full" else (
            "n/a" if r.get("rouge_l") is None else f"{float(r['rouge_l']):.3f}")
        seconds = (_number(stats.get("prefill_s")) or 0.0) + (_number(stats.get("decode_s")) or 0.0)
        speed = _number(stats.get("median_tokens_per_s", stats.get("tokens_per_s")))
        kv, full_kv = stats.get("kv_bytes"), stats.get("full_kv_bytes")
        kv_text = "n/a" if kv is None else human_bytes(kv)
        if kv is not None and full_kv:
            kv_text += f" ({kv / full_kv:.0%} of full)"
        cols.append(
            f'<td class="ec-answer" data-method="{html.escape(r["method"])}" style="vertical-align:top;padding:8px">'
            f"<h4 style='margin:0 0 6px 0'>{html.escape(method_name(r['method']))}</h4>"
            f"<div style='min-height:4em'>{answer if r['text'] else '<i>(empty answer)</i>'}</div>"
            f"<table style='margin-top:8px;font-size:0.9em'>"
            f"<tr><td>ROUGE-L vs full</td><td><b>{score}</b></td></tr>"
            f"<tr><td>time</td><td>{seconds:.2f} s</td></tr>"
            f"<tr><td>tokens/s</td><td>{'n/a' if speed is None else f'{speed:.1f}'}</td></tr>"
            f"<tr><td>KV kept</td><td>{kv_text}</td></tr></table></td>"
        )
    caption = "" if budget is None else f"<caption style='text-align:left'>budget {budget:g} " \
        f"(fraction of KV entries kept); under each answer, <mark style='{CHANGED}'>changed</mark> and " \
        f"<del style='{MISSING}'>missing</del> words relative to the full-cache answer; tokens/s from " \
        "the median decoding step</caption>"
    return (f'<table class="ec-compare" style="width:100%;table-layout:fixed;border-collapse:collapse">'
            f"{caption}<tr>{''.join(cols)}</tr></table>")


def summary_markdown(trace, stats: dict, warnings=()) -> str:
    """One line on what the answer's cache kept (plus any warnings), as Markdown.

    Parameters
    ----------
    trace : elastic.Trace
    stats : dict
        ``kv_bytes``, ``full_kv_bytes``, ``prefill_s``, ``tokens_per_s``, ``new_tokens``.
    warnings : list of str
    """
    kept, full = float(trace.lengths[-1]), int(trace.full_lengths()[-1])
    speed = _number(stats.get("tokens_per_s"))
    variant = variant_text(trace)
    # With one budget per layer (PrefixKV, VL-Cache) the layers differ: the mean over layers.
    per_layer = (" per layer on average", "; each layer has its own budget") if trace.budgets_per_layer else (
        " per layer", "")
    line = (f"**{method_name(trace.method)}**{f' ({variant})' if variant else ''}, budget {trace.budget:g}: "
            f"{entries_text(kept)} of {full} KV entries{per_layer[0]} "
            f"({kept / full:.0%}{per_layer[1]}), {human_bytes(stats['kv_bytes'])} vs {human_bytes(stats['full_kv_bytes'])} full. "
            f"Prefill {_number(stats.get('prefill_s')) or 0.0:.2f} s, "
            f"{'n/a' if speed is None else f'{speed:.1f}'} tokens/s, {stats.get('new_tokens')} new tokens.")
    if stats.get("stopped"):
        line = f"Stopped after {stats.get('new_tokens')} tokens. " + line
    return "\n\n".join([line] + [f"⚠️ {w}" for w in warnings])
