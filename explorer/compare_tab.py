"""The Compare tab's components, by name: the question and settings on the left, the
answers side by side and the two charts on the right."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

import elastic
import viz

from .defaults import COMPARE_METHODS, DEFAULT_MAX_NEW_TOKENS
from .guards import readable_image_input


@dataclass
class CompareTab:
    tab: gr.Tab
    image: gr.Image
    question: gr.Textbox
    budget: gr.Slider
    max_new: gr.Slider
    methods: gr.CheckboxGroup
    use_context: gr.Checkbox
    context: gr.State
    run: gr.Button
    stop: gr.Button
    # the outputs, in the order /compare returns them
    html: gr.HTML
    json: gr.JSON
    lengths: gr.Plot
    budgets: gr.Plot

    @property
    def inputs(self) -> list:
        """/compare's inputs, in its order."""
        return [self.image, self.question, self.budget, self.max_new, self.methods, self.use_context, self.context]

    @property
    def outputs(self) -> list:
        return [self.html, self.json, self.lengths, self.budgets]


def build_compare_tab(examples: list[dict]) -> CompareTab:
    """The Compare tab (call inside ``gr.Tabs``)."""
    c = {}
    with gr.Tab("Compare", id="compare") as c["tab"]:
        with gr.Row():
            with gr.Column(scale=2):
                c["image"] = readable_image_input(gr.Image(type="filepath", label="Image", height=220))
                c["question"] = gr.Textbox(label="Question", lines=2, elem_id="compare-question")
                with gr.Row():  # right under the question: inside a 720-pixel projector's view
                    c["run"] = gr.Button("Run side by side", variant="primary", elem_id="compare-run")
                    c["stop"] = gr.Button("Stop", variant="stop", elem_id="compare-stop")
                c["budget"] = gr.Slider(0.05, 1.0, value=0.3, step=0.05, label="Budget")
                c["max_new"] = gr.Slider(1, 512, value=DEFAULT_MAX_NEW_TOKENS, step=1,
                                         label="Max new tokens", elem_id="compare-max-new")
                c["methods"] = gr.CheckboxGroup(
                    [(viz.method_name(m), m) for m in elastic.METHODS if m != "full"],
                    value=[m for m in COMPARE_METHODS if m != "full"],
                    label="Methods beside the full cache", elem_id="compare-methods",
                    info="PrefixKV and VL-Cache give each layer its own budget: see the budget per layer "
                         "below the answers.")
                c["use_context"] = gr.Checkbox(False, visible=False, elem_id="compare-context",
                                               label="With the chat's earlier turns as context")
                c["context"] = gr.State(None)
                if examples:
                    gr.Examples([[e["image"], e["prompt"]] for e in examples], inputs=[c["image"], c["question"]],
                                elem_id="compare-examples")
            with gr.Column(scale=5):
                c["html"] = gr.HTML(label="comparison", elem_id="compare-html")
                c["lengths"] = gr.Plot(label="cache lengths", show_label=False)
                c["budgets"] = gr.Plot(label="budget per layer", show_label=False, elem_id="compare-budgets")
                with gr.Accordion("Answers and metrics (JSON, as the /compare API returns them)", open=False):
                    c["json"] = gr.JSON(label="Answers and metrics")
    return CompareTab(**c)
