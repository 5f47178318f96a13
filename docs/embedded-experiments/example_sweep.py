"""Which example scenes, methods and budgets give answers a teacher can stand behind?

    ./run.sh python docs/embedded-experiments/example_sweep.py --first 1 --n 8 --budgets 0.5,0.7

For the app's candidate example scenes (``elastic.tiny.data.example(i)``, the numbering of
``python -m elastic.tiny.data``), answers each with the full cache and with Elastic Cache, H2O and
Local at each budget (160 new tokens, the app's default; greedy, the default model, exactly as the app and
``tests/test_shipped_model.py`` do) and prints a right/wrong table. A description is right
when every object is named in its cell with its colour and shape; a question when the
answer is the reference. Not a test: it picks examples, which the tests then check.
"""

from __future__ import annotations

import argparse
import time

import torch

import elastic
from app import DEFAULT_MAX_NEW_TOKENS
from elastic.tiny.data import IMAGE_SIZE, example, render
from elastic.tiny.evaluate import answer_right


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--first", type=int, default=1)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--budgets", default="0.5,0.7")
    ap.add_argument("--methods", default="elastic,h2o,local")
    ap.add_argument("--model", default=None, help="default: the shipped model")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = elastic.load_model(args.model, device="cpu")
    runs = [("full", 1.0)] + [(m, float(b)) for b in args.budgets.split(",") for m in args.methods.split(",")]
    print("| index | seed | prompt | " + " | ".join(f"{m} {b:g}" if m != "full" else "full" for m, b in runs) + " |")
    print("|---" * (3 + len(runs)) + "|")
    start = time.time()
    for i in range(args.first, args.first + args.n):
        scene, prompt, reference = example(i)
        image = render(scene, 3 * IMAGE_SIZE)
        marks = []
        for method, budget in runs:
            answer = elastic.generate(model, processor, image, prompt, method=method, budget=budget,
                                      max_new_tokens=DEFAULT_MAX_NEW_TOKENS).text
            marks.append("right" if answer_right(scene, prompt, reference, answer) else "wrong")
        print(f"| {i} | {scene.seed} | {prompt} | " + " | ".join(marks) + " |", flush=True)
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
