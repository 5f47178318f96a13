"""The Explore tab's components, by name: the chat and its settings on the left, the
layer / step sliders and the figures on the right."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

import viz

from .defaults import (ABLATION_CHOICES, DEFAULT_BUDGET, DEFAULT_MAX_NEW_TOKENS, DEFAULT_METHOD, METHOD_CHOICES,
                       example_caption)
from .panel import PANEL, SHOWN_VIEWS, WAITING, explain_placeholder


@dataclass
class ExploreTab:
    tab: gr.Tab
    msg: gr.MultimodalTextbox
    status: gr.Markdown
    chatbot: gr.Chatbot
    # the settings, in the order /chat takes them after the message and history
    method: gr.Dropdown
    budget: gr.Slider
    start_size: gr.Slider
    distance: gr.Slider
    max_new: gr.Slider
    layer: gr.Slider
    importance: gr.Dropdown
    scope: gr.Dropdown
    prefill: gr.Dropdown
    decode: gr.Dropdown
    protect: gr.Dropdown
    step: gr.Slider
    head: gr.Slider
    send: gr.Button
    stop: gr.Button
    clear: gr.Button
    to_compare: gr.Button
    # the right panel, in panel.PANEL order
    heatmap: gr.Plot
    groups: gr.Plot
    overlay: gr.Plot
    timeline: gr.Plot
    explain: gr.HTML
    teach_groups: gr.Plot
    teach_timeline: gr.Plot
    budgets: gr.Plot
    shown: gr.Radio | None = None  # which figure tab the page shows (panel.SHOWN_VIEWS), sent with /live
    figure_tabs: tuple = ()
    examples: gr.Gallery | None = None  # the example scenes, as thumbnails (none without examples.json)

    @property
    def panel(self) -> list:
        """The panel's outputs in ``PANEL`` order (what every panel handler returns)."""
        return [getattr(self, name) for name in PANEL]

    @property
    def settings(self) -> list:
        """/chat's inputs after the message and the history."""
        return [self.method, self.budget, self.start_size, self.distance, self.max_new, self.layer,
                self.importance, self.scope, self.prefill, self.decode, self.protect]

    @property
    def sliders(self) -> list:
        return [self.layer, self.step, self.head]


def build_explore_tab(examples: list[dict]) -> ExploreTab:
    """The Explore tab (call inside ``gr.Tabs``)."""
    waiting = viz.message_figure(WAITING)
    c = {}
    with gr.Tab("Explore", id="explore") as c["tab"]:
        with gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=340, elem_id="explore-left"):
                # The main loop fits a 1280x720 projector without scrolling: the example scenes,
                # method and budget, the chat, the message box, Send and Stop. The rest is below.
                if examples:  # a click puts the scene, its question and its budget in place
                    c["examples"] = gr.Gallery(
                        [(e["image"], example_caption(i + 1, e)) for i, e in enumerate(examples)],
                        show_label=False, columns=len(examples), rows=1, height=120, allow_preview=False,
                        interactive=False, object_fit="contain", buttons=[], elem_id="chat-examples")
                with gr.Row(elem_id="method-budget"):
                    c["method"] = gr.Dropdown(METHOD_CHOICES, value=DEFAULT_METHOD, label="Method", elem_id="method",
                                              scale=2, min_width=140)
                    c["budget"] = gr.Slider(0.05, 1.0, value=DEFAULT_BUDGET, step=0.05, scale=3,
                                            elem_id="budget", label="Budget (fraction kept)")
                c["chatbot"] = gr.Chatbot(show_label=False, height=300, elem_id="chatbot")
                with gr.Row(equal_height=False, elem_id="ask"):
                    c["msg"] = gr.MultimodalTextbox(
                        file_types=["image"], file_count="single", sources=["upload"], elem_id="msg",
                        submit_btn=False, placeholder="Ask about the scene (or attach an image)…",
                        show_label=False, scale=5)
                    with gr.Column(scale=1, min_width=90, elem_id="send-stop"):
                        c["send"] = gr.Button("Send", variant="primary", size="sm", elem_id="send")
                        c["stop"] = gr.Button("Stop", size="sm", variant="stop", elem_id="stop")
                c["status"] = gr.Markdown(label="status", elem_id="status")
                with gr.Row():
                    c["clear"] = gr.Button("Clear chat", size="sm")
                    c["to_compare"] = gr.Button("Compare methods on this question", size="sm")
                with gr.Row():
                    c["start_size"] = gr.Slider(0, 16, value=1, step=1, label="Start size (sinks)")
                    c["distance"] = gr.Slider(-64, 0, value=-25, step=1,
                                              label="Distance (N_tl offset)")
                    c["max_new"] = gr.Slider(1, 512, value=DEFAULT_MAX_NEW_TOKENS, step=1,
                                             label="Max new tokens", elem_id="max-new")
                with gr.Accordion("Ablation: change one choice of Elastic Cache", open=False, elem_id="ablation"):
                    gr.Markdown("The defaults are the paper's method; each other value is one of its "
                                "ablations or a control of ours (see docs/ablations.md).")
                    with gr.Row():
                        c["importance"] = gr.Dropdown(list(ABLATION_CHOICES["importance"]), value="sum",
                                                      label="Importance score")
                        c["scope"] = gr.Dropdown(list(ABLATION_CHOICES["scope"]), value="layer",
                                                 label="Score computed per")
                        c["prefill"] = gr.Dropdown(list(ABLATION_CHOICES["prefill"]), value="merge",
                                                   label="Non-anchors at the prefill")
                    with gr.Row():
                        c["decode"] = gr.Dropdown(list(ABLATION_CHOICES["decode"]), value="fixed-point",
                                                  label="Victim while decoding")
                        c["protect"] = gr.Dropdown(list(ABLATION_CHOICES["protect"]), value="none",
                                                   label="Also protect")
            with gr.Column(scale=5, min_width=420):
                with gr.Row():
                    c["layer"] = gr.Slider(0, 1, value=0, step=1, label="Layer", elem_id="layer")
                    c["step"] = gr.Slider(0, 1, value=0, step=1, label="Decoding step (replay)", elem_id="step")
                    c["head"] = gr.Slider(0, 1, value=0, step=1, label="KV head (this method keeps entries per head)",
                                          visible=False, elem_id="head")
                with gr.Tabs():
                    with gr.Tab("Attention") as t_attention:
                        c["heatmap"] = gr.Plot(waiting, label="attention", show_label=False, elem_id="heatmap")
                    with gr.Tab("Anchors & groups") as t_groups:
                        c["groups"] = gr.Plot(waiting, label="groups", show_label=False, elem_id="groups")
                    with gr.Tab("Image") as t_image:
                        c["overlay"] = gr.Plot(waiting, label="image", show_label=False, elem_id="overlay")
                    with gr.Tab("Cache over time") as t_timeline:
                        c["timeline"] = gr.Plot(waiting, label="timeline", show_label=False, elem_id="timeline")
                        # Below the timeline, not a tab of its own: a seventh tab would not fit a
                        # 1280-pixel panel (gradio folds it, and "How it works", into a menu).
                        c["budgets"] = gr.Plot(waiting, label="budget per layer", show_label=False,
                                               elem_id="budgets")
                    with gr.Tab("How it works") as t_how:
                        c["explain"] = gr.HTML(explain_placeholder(), label="explanation", elem_id="explain")
                        c["teach_groups"] = gr.Plot(waiting, label="teaching groups", show_label=False)
                        c["teach_timeline"] = gr.Plot(waiting, label="teaching timeline", show_label=False)
                # Hidden: set by the page as the tabs are chosen, so /live draws only what is seen.
                c["shown"] = gr.Radio(list(SHOWN_VIEWS), value="all", label="Figure tab shown", visible="hidden",
                                      elem_id="shown")
    c["figure_tabs"] = (t_attention, t_groups, t_image, t_timeline, t_how)
    return ExploreTab(**c)
