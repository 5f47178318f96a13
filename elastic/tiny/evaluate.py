"""Evaluate a scene model (the default SmolLM2 with eyes, or the tiny LLaVA) on validation scenes, with or
without KV compression.

    python -m elastic.tiny.evaluate --seed 0 --n 200
    python -m elastic.tiny.evaluate --seed 0 --n 200 --method elastic --budget 0.3
    accelerate launch --multi_gpu --num_processes 2 -m elastic.tiny.evaluate --n 200 --threads 2   # 2 CPU processes

For each scene the model greedily describes the image ("Describe the image in
detail.") and answers three questions, each in a fresh single-turn chat. The
description is parsed back into objects and compared with the true scene.
The last printed line is ``accuracy=<x>``: the fraction of true objects whose
colour, shape and position are all described correctly (missing objects count
as wrong).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict

import torch
from tqdm import tqdm

from .data import (CELLS, DESCRIBE_PROMPT, NUMBERS, VAL_OFFSET, chat_messages, describe,
                   eval_questions, make_scene, render)
from ..quantize import QUANTIZE_CHOICES

OBJECT_RE = re.compile(r"In the (" + "|".join(CELLS) + r") there is an? (\w+) (\w+) (\w+)\.")
INTRO_RE = re.compile(r"The image shows (\w+) objects? on an? (\w+) background")


def parse_description(text: str) -> dict:
    """Parse a generated description into ``{"count", "background", "objects"}``.

    ``objects`` is a list of ``(cell, size, colour, shape)`` with ``cell`` an index
    into ``CELLS``; sentences that do not follow the template are ignored.
    """
    intro = INTRO_RE.search(text)
    count = NUMBERS.index(intro.group(1)) if intro and intro.group(1) in NUMBERS else None
    objects = [(CELLS.index(c), size, colour, shape) for c, size, colour, shape in OBJECT_RE.findall(text)]
    return {"count": count, "background": intro.group(2) if intro else None, "objects": objects}


def score_description(scene, text: str) -> dict:
    """Per-field correctness counts of one description against its scene.

    Colour, shape and size are judged on the predicted object in the true
    object's cell; position is right when the predicted object with the true
    colour and shape sits in the true cell; ``all`` needs cell, colour and shape.
    """
    parsed = parse_description(text)
    preds = parsed["objects"]
    by_cell = {}
    for p in preds:
        by_cell.setdefault(p[0], p)
    s = defaultdict(int)
    for o in scene.objects:
        p = by_cell.get(o.cell)
        s["objects"] += 1
        s["colour"] += bool(p and p[2] == o.colour)
        s["shape"] += bool(p and p[3] == o.shape)
        s["size"] += bool(p and p[1] == o.size)
        s["position"] += any(q[0] == o.cell for q in preds if (q[2], q[3]) == (o.colour, o.shape))
        s["all"] += any((q[0], q[2], q[3]) == (o.cell, o.colour, o.shape) for q in preds)
    truth = {(o.cell, o.size, o.colour, o.shape) for o in scene.objects}
    s["predicted"] = len(preds)
    s["hallucinated"] = sum(p not in truth for p in preds)
    s["count"] = parsed["count"] == len(scene.objects)
    s["background"] = parsed["background"] == scene.background
    s["exact"] = text.strip() == describe(scene)
    return s


def all_objects_right(scene, text: str) -> bool:
    """Every object of ``scene`` named in its cell with its colour and shape."""
    score = score_description(scene, text)
    return score["all"] == score["objects"] == len(scene.objects)


def answer_right(scene, prompt: str, reference: str, answer: str) -> bool:
    """An example's answer is right: a description names every object rightly, an answer
    to a question is the reference exactly."""
    return all_objects_right(scene, answer) if prompt == DESCRIBE_PROMPT else answer == reference


@torch.inference_mode()
def generate(model, processor, image, question: str, max_new_tokens: int = 128, cache=None) -> str:
    """Greedy answer to ``question`` about ``image`` in a fresh single-turn chat."""
    prompt = processor.apply_chat_template(chat_messages([(question, "")], add_answer_last=False),
                                           add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    inputs = inputs.to(model.device)  # a no-op on the CPU
    kwargs = {} if cache is None else {"cache": cache}
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _new_cache(model, method: str, budget: float):
    """A function returning a fresh cache for one generation (None for the full cache)."""
    if method == "full":
        return lambda: None  # let generate build its own
    import elastic  # lazy: elastic.tiny must not need the rest of the library

    elastic.attach(model)
    return lambda: elastic.make_cache(method, budget=budget)


def score_scene(model, processor, seed: int, method: str = "full", budget: float = 1.0,
                qa_per_scene: int = 3) -> dict:
    """One scene's counts: ``{"description": score_description(...), "qa": {kind: [right, asked]}}``."""
    new_cache = _new_cache(model, method, budget)
    scene = make_scene(seed)
    image = render(scene)
    text = generate(model, processor, image, DESCRIBE_PROMPT, cache=new_cache())
    qa = defaultdict(lambda: [0, 0])
    for kind, question, answer in eval_questions(scene, qa_per_scene):
        pred = generate(model, processor, image, question, max_new_tokens=64, cache=new_cache())
        qa[kind][0] += pred == answer
        qa[kind][1] += 1
    return {"description": dict(score_description(scene, text)), "qa": dict(qa)}


def summarize(scores: list[dict]) -> dict:
    """Accuracies over scenes from their :func:`score_scene` counts (sums: any order gives the same)."""
    totals, qa = defaultdict(int), defaultdict(lambda: [0, 0])
    for score in scores:
        for k, v in score["description"].items():
            totals[k] += v
        for kind, (right, asked) in score["qa"].items():
            qa[kind][0] += right
            qa[kind][1] += asked
    n_obj, n = totals["objects"], len(scores)
    result = {f: totals[f] / n_obj for f in ("colour", "shape", "size", "position")}
    result.update({f: totals[f] / n for f in ("count", "background", "exact")})
    result["precision"] = 1 - totals["hallucinated"] / max(1, totals["predicted"])
    result["qa_by_kind"] = {k: c / t for k, (c, t) in sorted(qa.items())}
    result["qa"] = sum(c for c, _ in qa.values()) / max(1, sum(t for _, t in qa.values()))
    result["accuracy"] = totals["all"] / n_obj
    return result


def evaluate(model, processor, seeds, method: str = "full", budget: float = 1.0, qa_per_scene: int = 3,
             progress: bool = True) -> dict:
    """Describe and question every scene in ``seeds``; return accuracies.

    For ``method != "full"`` each generation gets a fresh
    ``elastic.make_cache(method, budget=budget)``.
    """
    seeds = list(seeds)
    return summarize([score_scene(model, processor, seed, method, budget, qa_per_scene)
                      for seed in tqdm(seeds, desc=f"eval {method}", disable=not progress, mininterval=5)])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="default: the shipped default model (scene-smollm2); or tiny-llava, or a LLaVA directory")
    ap.add_argument("--seed", type=int, default=0, help="offset into the validation seeds")
    ap.add_argument("--n", type=int, default=200, help="number of validation scenes")
    ap.add_argument("--method", default="full", help="full, elastic, h2o or local")
    ap.add_argument("--budget", type=float, default=0.5, help="KV budget (ignored for full)")
    ap.add_argument("--qa-per-scene", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2,
                    help="CPU threads (under a launcher: of this machine, split among its processes)")
    ap.add_argument("--device", default="cpu",
                    help="cpu or cuda (under a launcher with cuda: one GPU per process)")
    ap.add_argument("--quantize", default=None, choices=QUANTIZE_CHOICES, help="weight-only int8 language model")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)

    from .. import distributed
    from ..models import DEFAULT_MODEL, load_model

    current = distributed.state(cpu=args.device.startswith("cpu"))  # one process without a launcher
    torch.set_num_threads(distributed.split_threads(current, args.threads) or args.threads)
    model, processor = load_model(args.model, device=distributed.device(current, args.device),
                                  quantize=args.quantize)
    args.model = args.model or DEFAULT_MODEL
    budget = 1.0 if args.method == "full" else args.budget
    start = VAL_OFFSET + args.seed
    t0 = time.time()
    seeds = distributed.shard(range(start, start + args.n), current)  # the scenes are independent
    scores = [score_scene(model, processor, seed, args.method, budget, args.qa_per_scene)
              for seed in tqdm(seeds, desc=f"eval {args.method}", disable=not current.is_main_process, mininterval=5)]
    r = summarize(distributed.gather(scores, current))
    if not current.is_main_process:
        return
    quantized = " (int8)" if args.quantize else ""
    print(f"model={args.model}{quantized} method={args.method} budget={budget} scenes={args.n} "
          f"seeds={start}..{start + args.n - 1} time={time.time() - t0:.0f}s")
    print(" ".join(f"{k}={r[k]:.3f}" for k in ("colour", "shape", "size", "position", "count", "background",
                                               "precision", "exact")))
    print("qa_by_kind " + " ".join(f"{k}={v:.3f}" for k, v in r["qa_by_kind"].items()))
    print(f"qa_accuracy={r['qa']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **r}, f, indent=2)
    print(f"accuracy={r['accuracy']:.3f}")


if __name__ == "__main__":
    main()
