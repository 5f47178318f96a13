"""Decode speed of the default model with its language model's linear layers in int8.

    ./run.sh python docs/embedded-experiments/int8_speed.py

``torch.ao.quantization.quantize_dynamic`` (int8 weights, activations quantised on the
fly) on every ``nn.Linear`` of SmolLM2 and on the LM head, against the float32 model, on
the first example's description (full cache, up to 80 new tokens, 2 threads, three
alternating runs each). Result (2026-12-02, nothing else running): float32 16.0-18.1
tokens/s, int8 20.3-26.3 (about 1.5x), but the int8 answer changed: it starts with "1."
and puts the green triangle bottom right instead of bottom middle. Not adopted: a faster
model that reads the scene worse needs the full evaluation first.
"""

import time

import torch

import app
import elastic


def main():
    torch.set_num_threads(2)
    example = app.load_examples(app.EXAMPLES_DIR)[0]
    fp32, processor = elastic.load_model()
    int8, _ = elastic.load_model()
    int8.model.language_model = torch.ao.quantization.quantize_dynamic(
        int8.model.language_model, {torch.nn.Linear}, dtype=torch.qint8)
    int8.lm_head = torch.ao.quantization.quantize_dynamic(
        torch.nn.Sequential(int8.lm_head), {torch.nn.Linear}, dtype=torch.qint8)[0]
    speeds, answers = {"float32": [], "int8": []}, {}
    for _ in range(3):
        for name, model in (("float32", fp32), ("int8", int8)):
            start = time.perf_counter()
            gen = elastic.generate(model, processor, example["image"], example["prompt"], method="full", budget=1.0,
                                   max_new_tokens=80)
            speeds[name].append(gen.stats["new_tokens"] / (time.perf_counter() - start))
            answers[name] = gen.text
    for name in speeds:
        print(f"{name}: {', '.join(f'{s:.1f}' for s in speeds[name])} tokens/s end to end\n  {answers[name]!r}")


if __name__ == "__main__":
    main()
