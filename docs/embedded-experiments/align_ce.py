"""The align step of train_smol with and without the cross-entropy over the slot words.

Starts from a ``train_smol`` checkpoint past the read step (its tower and classifier head),
builds the projector from the classifier (``projector_from_classifier``), fine-tunes it
with ``align_loss`` and prints how often an image token's nearest vocabulary word is its
slot word, on 64 fixed validation scenes (all tokens, then the object words):

    ./run.sh python docs/embedded-experiments/align_ce.py --ce 0 --steps 150 --lr 5e-4   # run 4's align
    ./run.sh python docs/embedded-experiments/align_ce.py --ce 1 --steps 150 --lr 5e-4
    ./run.sh python docs/embedded-experiments/align_ce.py --ce 1 --steps 400 --lr 1e-3   # run 5's align

``--checkpoint`` defaults to ``runs/run5/checkpoint.pt``; any checkpoint written after the
read step serves (``python -m elastic.tiny.train_smol --steps 0 --align-steps 0 --out runs/read``
writes one in about 8 minutes). Results (2026-12-01, run 4's checkpoint, 2 threads, about
1.5 / 1.5 / 4.6 minutes; the classifier itself: 0.997 / 0.981):

| align | object words nearest to their word, step 50 / 100 / 150 / 400 | all tokens at the end |
|---|---|---|
| squared distance, 150 steps, lr 5e-4 (run 4) | 0.805 / 0.881 / 0.885 / - | 0.977 |
| + cross-entropy, 150 steps, lr 5e-4 | 0.863 / 0.934 / 0.944 / - | 0.989 |
| + cross-entropy, 400 steps, lr 1e-3 (run 5) | - / - / - / 0.974 | 0.996 |
"""

import argparse
import random
import time

import torch

import elastic
from elastic.tiny import smol_vision as vision
from elastic.tiny.data import VAL_OFFSET, make_scene, render
from elastic.tiny.train import lr_at


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="runs/run5/checkpoint.pt")
    ap.add_argument("--ce", type=float, default=1.0, help="weight of the cross-entropy (0: squared distance only)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, processor = elastic.load_model()
    state = torch.load(args.checkpoint, weights_only=False)
    words, word_ids = vision.slot_vocabulary(processor.tokenizer)
    head = torch.nn.Linear(model.config.vision_config.hidden_size, len(words))
    head.load_state_dict(state["head"])
    model.model.vision_tower.load_state_dict(state["tower"])
    rng = random.Random(1)

    def batch(n=32, first=None):
        scenes = [make_scene(rng.randrange(VAL_OFFSET) if first is None else first + i) for i in range(n)]
        return scenes, processor.image_processor([render(s) for s in scenes], return_tensors="pt")["pixel_values"]

    val_scenes, val_pixels = batch(64, VAL_OFFSET)
    val_targets = word_ids[vision.slot_classes(words, val_scenes)]
    with torch.no_grad():
        tokens, _ = vision.tower_tokens(model, val_pixels)
        hit = head(tokens).argmax(-1) == vision.slot_classes(words, val_scenes)
    print(f"classifier: {hit.float().mean():.3f} / {hit[vision.object_mask(val_scenes)].float().mean():.3f}")
    vision.projector_from_classifier(model, head, word_ids, batch()[1])
    print("map: %.3f / %.3f" % vision.word_accuracy(model, val_pixels, val_targets, val_scenes))
    for p in model.parameters():
        p.requires_grad_(False)
    projector = list(model.model.multi_modal_projector.parameters())
    for p in projector:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": projector, "peak": args.lr}], weight_decay=0.0)
    start = time.time()
    for step in range(args.steps):
        scenes, pixels = batch()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, g["peak"], 30)
        loss = vision.align_loss(model, pixels, vision.slot_classes(words, scenes), word_ids, args.ce)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0:
            hit, object_hit = vision.word_accuracy(model, val_pixels, val_targets, val_scenes)
            print(f"step {step + 1}: loss {loss.item():.4f}, nearest word {hit:.3f} / {object_hit:.3f} "
                  f"({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
