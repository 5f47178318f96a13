"""Figures for Elastic Cache traces: pure functions from a trace (and image) to plotly / HTML.

No gradio and no model code here: every function reads an :class:`elastic.Trace` and
never recomputes the algorithm (anchors are ``trace.layers[l].kept``, groups
``trace.layers[l].group``, the cache at a step ``trace.positions_at(l, s)``).
Every figure reads on a projector: text >= 14 px (titles 18) in near-black on the figure's
own white background (WCAG AA in gradio's light and dark themes), see ``viz.style``.

    import viz
    viz.attention_heatmap(trace, layer)     # layer x position importance, spans, the layer's anchors
    viz.merge_groups(trace, layer, step)    # every position coloured by its anchor
    viz.image_overlay(trace, image, layer, step)  # patches over the input image
    viz.cache_timeline(trace, layer, step)  # length / KV bytes vs decoding step, N_tl
    viz.lengths_figure({method: trace})     # several methods' cache lengths on one prompt
    viz.layer_budgets_figure({method: trace})  # entries each layer kept after the prefill, per method
    viz.compare_html(results)               # answers side by side, metrics, word diff
    viz.explain_html(trace, layer)          # "How it works" with this prompt's numbers
"""

from .budgets import layer_budgets_figure
from .groups import merge_groups
from .heatmap import attention_heatmap
from .image import image_grid, image_overlay
from .state import PromptState, prompt_state
from .style import human_bytes, message_figure, method_name, resolve_step
from .teaching import explain_html
from .text import compare_html, diff_html, diff_tokens, summary_markdown
from .timeline import cache_timeline, lengths_figure

__all__ = [
    "attention_heatmap", "merge_groups", "image_overlay", "image_grid", "cache_timeline", "lengths_figure",
    "layer_budgets_figure",
    "human_bytes", "message_figure", "method_name", "resolve_step",
    "compare_html", "diff_html", "diff_tokens", "summary_markdown", "explain_html", "prompt_state", "PromptState",
]
