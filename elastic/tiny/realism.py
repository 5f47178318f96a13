"""How real is a model's attention? Attention sink and position bias of the importance score.

    python -m elastic.tiny.realism --n 50                           # the default model (scene-smollm2)
    python -m elastic.tiny.realism --n 50 --model tiny-llava        # the 4-layer tiny LLaVA

For ``--n`` validation scenes (one question each, rotating through the question kinds and
the description prompt) the prompt is prefilled once and, per layer, Elastic Cache's
importance score is taken from the cache's trace: the attention each prompt token
receives, summed over all prompt queries and averaged over heads. Printed per layer,
averaged over the prompts:

* ``sink``: the share of that column-sum mass on the first token (an attention sink
  shows as >= 0.2; uniform causal attention would give about 1/T * H_T, ~0.04 here);
* ``spearman``: the rank correlation of the score with the token's position (-1: the
  score is just "how early the token is", as on a model whose attention is near uniform).
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch

from .data import DESCRIBE_PROMPT, QA_KINDS, VAL_OFFSET, ask, make_scene, render


def _ranks(v: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, ties sharing their average rank."""
    order = np.argsort(v, kind="stable")
    _, first, counts = np.unique(v[order], return_index=True, return_counts=True)
    ranks = np.empty(len(v))
    ranks[order] = np.repeat(first + (counts - 1) / 2, counts)
    return ranks


def spearman(x, y) -> float:
    """Spearman's rank correlation of two sequences."""
    rx, ry = _ranks(np.asarray(x, float)), _ranks(np.asarray(y, float))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / np.sqrt((rx ** 2).sum() * (ry ** 2).sum()))


def prompts(n: int, seed: int = 0):
    """``n`` (image, question) pairs on fresh validation scenes."""
    kinds = [*QA_KINDS, "describe"]
    for i in range(n):
        scene = make_scene(VAL_OFFSET + seed + i)
        kind = kinds[i % len(kinds)]
        question = DESCRIBE_PROMPT if kind == "describe" else ask(scene, kind, random.Random(i))[0]
        yield render(scene), question


@torch.inference_mode()
def measure(model, processor, n: int = 50, seed: int = 0) -> dict[str, np.ndarray]:
    """Per layer, the mean over ``n`` prompts of the sink share and of Spearman(score, position)."""
    import elastic

    elastic.attach(model)
    sinks, rhos = [], []
    for image, question in prompts(n, seed):
        inputs, _ = elastic.build_inputs(model, processor, [elastic.user_message(question, True)], image)
        cache = elastic.make_cache("elastic", budget=1.0)
        model(**inputs, cache=cache, use_cache=True)
        scores = [layer.scores for layer in cache.trace.layers]
        sinks.append([s[0] / s.sum() for s in scores])
        rhos.append([spearman(s, np.arange(len(s))) for s in scores])
    return {"sink": np.mean(sinks, 0), "spearman": np.mean(rhos, 0)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the default model (scene-smollm2); or tiny-llava, a path, a hub id")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0, help="offset into the validation seeds")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import elastic

    model, processor = elastic.load_model(args.model, device="cpu")
    r = measure(model, processor, args.n, args.seed)
    print(f"model={args.model or 'default'} prompts={args.n}")
    print("layer  sink   spearman")
    for i, (s, rho) in enumerate(zip(r["sink"], r["spearman"])):
        print(f"{i:5d}  {s:.3f}  {rho:+.3f}")
    layers = len(r["sink"])
    print(f"layers_with_sink={int((r['sink'] >= 0.2).sum())}/{layers} "
          f"max_abs_spearman={np.abs(r['spearman']).max():.3f} median_spearman={np.median(r['spearman']):+.3f}")


if __name__ == "__main__":
    main()
