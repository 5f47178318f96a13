"""Decode speed of the default model with lower-precision weights, against float32.

    ./run.sh python docs/embedded-experiments/int8_speed.py

Four variants of the shipped model, on the first example's description (full cache, up to
80 new tokens, 2 threads, three alternating runs each, end to end through
``elastic.generate``):

* ``float32``: the shipped model;
* ``bfloat16``: ``elastic.load_model(dtype=torch.bfloat16)``;
* ``int8 dynamic``: ``torch.ao.quantization.quantize_dynamic`` on every ``nn.Linear`` of
  SmolLM2 and on the LM head (int8 weights, activations quantised per call);
* ``int8 weights``: ``elastic.load_model(quantize="int8")``, weight-only int8 (per output
  row, symmetric) through ``torch.ops.aten._weight_int8pack_mm`` with bfloat16 activations
  (``elastic/quantize.py``).

Results (this 2-core Xeon, nothing else running):

* 2026-12-02 (session 12; only float32 and int8 dynamic then): float32 16.0-18.1 tokens/s,
  int8 dynamic 20.3-26.3 (about 1.5x), but its answer changed: it starts with "1." and puts
  the green triangle bottom right instead of bottom middle.
* 2026-12-02 (session 13, the four variants; 57 s): float32 14.6-19.5 tokens/s (72 tokens
  in 3.69-4.94 s), bfloat16 13.5-16.7, int8 dynamic 20.1-32.7 but a wrong and short answer
  ("The image shows two objects ... The other five cells are empty.", 34 tokens; the scene
  has three), int8 weights 20.7-26.2 (2.75-3.47 s) with float32's answer word for word.

Adopted: int8 weights, as an option (``quantize="int8"``, the app's ``--quantize int8``),
not as the default, since every number in ``docs/`` is float32's. Its accuracy on the
validation scenes is in ``docs/embedded-model.md`` ("Speed").
"""

import time

import torch

import app
import elastic


def int8_dynamic(model):
    model.model.language_model = torch.ao.quantization.quantize_dynamic(
        model.model.language_model, {torch.nn.Linear}, dtype=torch.qint8)
    model.lm_head = torch.ao.quantization.quantize_dynamic(
        torch.nn.Sequential(model.lm_head), {torch.nn.Linear}, dtype=torch.qint8)[0]
    return model


def main():
    torch.set_num_threads(2)
    example = app.load_examples(app.EXAMPLES_DIR)[0]
    fp32, processor = elastic.load_model()
    models = {"float32": fp32, "bfloat16": elastic.load_model(dtype=torch.bfloat16)[0],
              "int8 dynamic": int8_dynamic(elastic.load_model()[0]),
              "int8 weights": elastic.load_model(quantize="int8")[0]}
    seconds, answers = {name: [] for name in models}, {}
    for _ in range(3):
        for name, model in models.items():
            start = time.perf_counter()
            gen = elastic.generate(model, processor, example["image"], example["prompt"], method="full", budget=1.0,
                                   max_new_tokens=80)
            seconds[name].append(time.perf_counter() - start)
            answers[name] = (gen.stats["new_tokens"], gen.text)
    for name in models:
        new, text = answers[name]
        print(f"{name}: {', '.join(f'{s:.2f}' for s in seconds[name])} s for {new} tokens "
              f"({', '.join(f'{new / s:.1f}' for s in seconds[name])} tokens/s)\n  {text!r}")


if __name__ == "__main__":
    main()
