"""Which example can open the app: a scene where Elastic Cache keeps the full cache's answer?

    ./run.sh python docs/embedded-experiments/first_example.py --first 1 --n 16 --budgets 0.5,0.6,0.7,0.8,0.9

For the app's candidate example scenes (``elastic.tiny.data.example(i)``), answers each with the
full cache, then with Elastic Cache (the paper's options) at every budget, greedy, the app's
default 160 new tokens, the default model. Prints per budget: right/wrong (as the app's tests
judge it, ``answer_right``) and ``=`` where the answer is the full cache's, word for word.
Not a test: it picks the app's first examples and its default budget (docs/app.md says which).
"""

from __future__ import annotations

import argparse
import time

import torch

import elastic
from elastic.tiny.data import IMAGE_SIZE, example, render
from elastic.tiny.evaluate import answer_right

MAX_NEW_TOKENS = 160  # the app's default


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--first", type=int, default=1)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--budgets", default="0.5,0.6,0.7,0.8,0.9")
    ap.add_argument("--method", default="elastic")
    ap.add_argument("--questions-only", action="store_true", help="skip the descriptions (even indices)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = elastic.load_model(device="cpu")
    budgets = [float(b) for b in args.budgets.split(",")]
    print(f"| index | seed | prompt | full | " + " | ".join(f"{args.method} {b:g}" for b in budgets) + " |")
    print("|---" * (4 + len(budgets)) + "|")
    start = time.time()
    for i in range(args.first, args.first + args.n):
        if args.questions_only and i % 2 == 0:
            continue
        scene, prompt, reference = example(i)
        image = render(scene, 3 * IMAGE_SIZE)

        def answer(method, budget):
            return elastic.generate(model, processor, image, prompt, method=method, budget=budget,
                                    max_new_tokens=MAX_NEW_TOKENS).text

        full = answer("full", 1.0)
        marks = ["right" if answer_right(scene, prompt, reference, full) else "wrong"]
        for b in budgets:
            text = answer(args.method, b)
            mark = "right" if answer_right(scene, prompt, reference, text) else "wrong"
            marks.append(mark + (" =" if text == full else ""))
        print(f"| {i} | {scene.seed} | {prompt} | " + " | ".join(marks) + " |", flush=True)
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
