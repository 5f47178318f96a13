"""Train the shipped tiny LLaVA from scratch on synthetic scenes (2-core CPU, ~36 min).

    python -m elastic.tiny.train                      # reproduces assets/tiny-llava
    python -m elastic.tiny.train --vision-steps 50 --steps 50 --out /tmp/smoke

The model is a stock ``LlavaForConditionalGeneration`` (tiny CLIP vision tower +
tiny Llama with grouped-query attention) and a ``LlavaProcessor`` with a freshly
trained tokenizer, saved with ``save_pretrained`` so it loads exactly like
``llava-hf/llava-1.5-7b-hf``. Every batch is new: scenes are drawn from the
training seed range, so there is no epoch and no overfitting to a fixed set.

Two stages, as in LLaVA (whose vision tower arrives pretrained):

1. vision: the CLIP tower and the projector learn, through a throw-away linear
   head, what object sits in each patch's grid cell (cheap: no language model);
2. joint: everything trains on the chats (loss on assistant tokens only, answers
   and their ``</s>``), the patch loss kept as an auxiliary term, and some
   attention heads told where to look while writing (``LookGuide``): two on the
   image cells the text is about, and at a relation's verdict one head per word it
   compares (``data.TEXT_EVIDENCE``).

Trained jointly from scratch the model found the text prior first and ignored
the image (shape accuracy at chance); the vision stage fixes that. Without the
look guide it described images well but answered questions at 0.57: it read the
image by position, in the description's fixed order, and never learned to find
a cell or an object by content. With the guide on answers only, the description
moved onto the guided heads and put objects in neighbouring cells; guiding its
object sentences too brought it to 0.98 (docs/tiny-model.md).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor)

from . import SHIPPED_MODEL_DIR
from .data import (COLOURS, DESCRIBE_PROMPT, IMAGE_SIZE, QA_KINDS, SHAPES, SIZES, TEXT_EVIDENCE, VAL_OFFSET, ask,
                   chat_messages, conversation, corpus, describe, evidence_spans, make_scene, render)
from .tokenizer import CHAT_TEMPLATE, IMAGE, train_tokenizer

PATCH_SIZE = 12  # 108 / 12 = 9x9 = 81 image tokens (CLS dropped, as in LLaVA-1.5);
# every grid cell is exactly 3x3 patches, which made the tower learn shapes much faster
# than a 96 px / 8x8 layout whose patches straddle cells.
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2


def build_processor(seed: int = 0) -> LlavaProcessor:
    """Train the tokenizer and assemble the LLaVA processor.

    ``num_additional_image_tokens=1`` plus strategy ``"default"`` makes the
    processor expand ``<image>`` to 81 + 1 - 1 = 81 tokens, exactly the number
    of patch features the model keeps after dropping CLS.
    """
    tokenizer = train_tokenizer(corpus(3000, seed))
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def build_model(tokenizer, vision_layers: int = 4) -> LlavaForConditionalGeneration:
    """A ~4M-parameter LLaVA: 4-layer CLIP (128 wide) + 4-layer Llama (256 wide,
    8 query heads sharing 4 KV heads)."""
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=vision_layers,
                              num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768,
                       num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                       max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id,
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         image_seq_length=NUM_IMAGE_TOKENS)
    model = LlavaForConditionalGeneration(config)
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                         tokenizer.pad_token_id)
    gc.do_sample, gc.max_new_tokens = False, 128
    return model


def _render(tokenizer, msgs, gen: bool) -> str:
    """The chat as the processor sees it: template applied, ``<image>`` expanded."""
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    return text.replace(IMAGE, IMAGE * NUM_IMAGE_TOKENS)


def encode_chat(tokenizer, turns: list[tuple[str, str]]) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """Token ids, labels and answer spans of a chat; labels are -100 except on answers.

    Each answer span ``[start, end)`` is found by tokenising the chat rendered up
    to the generation prompt and up to the end of that answer, so training sees
    exactly the tokens that ``apply_chat_template`` + the processor produce at inference.
    """
    msgs = chat_messages(turns)
    ids = tokenizer(_render(tokenizer, msgs, False)).input_ids
    labels = [-100] * len(ids)
    spans = []
    for k in range(len(turns)):
        start = len(tokenizer(_render(tokenizer, msgs[:2 * k + 1], True)).input_ids)
        end = len(tokenizer(_render(tokenizer, msgs[:2 * k + 2], False)).input_ids)
        labels[start:end] = ids[start:end]
        spans.append((start, end))
    return ids, labels, spans


def char_tokens(tokenizer, turns: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """For every turn, the index (in ``encode_chat``'s ids) of the token holding each
    character of its question and of its answer; a space belongs to the token it starts."""
    msgs = chat_messages(turns)
    text = _render(tokenizer, msgs, False)
    owner = [-1] * (len(text) + 1)
    for t, (a, b) in enumerate(tokenizer(text, return_offsets_mapping=True)["offset_mapping"]):
        owner[a:b] = [t] * (b - a)
    for i in range(len(text) - 1, -1, -1):  # untracked characters (spaces) go to the next token
        if owner[i] < 0:
            owner[i] = owner[i + 1]
    result = []
    for k, (question, answer) in enumerate(turns):
        q_at = text.index(question, len(_render(tokenizer, msgs[:2 * k], False)) if k else 0)
        at = text.index(answer, len(_render(tokenizer, msgs[:2 * k + 1], True)))
        result.append((owner[q_at:q_at + len(question)], owner[at:at + len(answer)]))
    return result


GRID = IMAGE_SIZE // PATCH_SIZE
N_PATCH_CLASSES = 1 + len(COLOURS) * len(SHAPES) * len(SIZES)  # empty, or (colour, shape, size)


def patch_cells() -> torch.Tensor:
    """The scene grid cell (0-8, row-major) that each image token lies in."""
    centre = (torch.arange(GRID) * PATCH_SIZE + PATCH_SIZE // 2) * 3 // IMAGE_SIZE
    return (3 * centre[:, None] + centre[None, :]).flatten()


def patch_labels(scene) -> torch.Tensor:
    """Training-only target for every image token: the object in its grid cell."""
    labels = torch.zeros(GRID * GRID, dtype=torch.long)
    colours = list(COLOURS)
    for i, cell in enumerate(patch_cells().tolist()):
        o = scene.at(cell)
        if o:
            labels[i] = 1 + (colours.index(o.colour) * len(SHAPES) + SHAPES.index(o.shape)) * 2 + SIZES.index(o.size)
    return labels


class PatchProbe(torch.nn.Module):
    """Training-only linear heads on the image tokens as the LM sees them (projector output).

    They must read off every token the object in its grid cell and the cell itself.
    This teaches the vision tower "what is where" directly, and makes "where" a
    content feature the LM's attention can match ("top middle" -> those tokens)
    rather than a position it must learn to count. The probe is thrown away, so
    the shipped model stays a stock LLaVA.
    """

    def __init__(self, width: int):
        super().__init__()
        self.object = torch.nn.Linear(width, N_PATCH_CLASSES)
        self.cell = torch.nn.Linear(width, 9)
        self.register_buffer("cells", patch_cells(), persistent=False)

    def loss(self, features: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
        ce = torch.nn.functional.cross_entropy
        cells = self.cells.expand(len(features), -1)
        return ce(self.object(features).flatten(0, 1), objects.flatten()) + ce(self.cell(features).flatten(0, 1),
                                                                                 cells.flatten())


def mark_evidence(look: torch.Tensor, ids: list[int], turns, spans, owners, scene, image_token_id: int,
                  evidence=evidence_spans) -> None:
    """Set ``look[t, k]`` (a ``seq x seq`` bool mask) for every position ``t`` that
    predicts a token of an answer span and every image token ``k`` in a cell that
    span depends on, according to ``evidence(scene, question, answer)`` (character
    spans, mapped to tokens with ``owners`` from ``char_tokens``). A span
    that ends the answer also covers the prediction of its ``</s>``."""
    cells = patch_cells()
    image_pos = torch.tensor([i for i, t in enumerate(ids) if t == image_token_id])
    for (question, answer), (_, end), (_, owner) in zip(turns, spans, owners):
        for a, b, found in evidence(scene, question, answer):
            last = end - 1 if b == len(answer) else owner[b - 1]  # the last token predicted
            look[owner[a] - 1:last, image_pos[torch.isin(cells, torch.tensor(found))]] = True


def mark_copies(look: torch.Tensor, turns, owners, copies) -> None:
    """Set ``look[t, k]`` for every position ``t`` that predicts a token of
    ``answer[a:b]`` and every token ``k`` of ``source[sa:sb]``, for each
    ``(a, b, source, sa, sb)`` in ``copies(question, answer)`` (``data.TEXT_EVIDENCE``),
    ``source`` being the question or the answer of the same turn."""
    for (question, answer), (q_owner, a_owner) in zip(turns, owners):
        for a, b, source, sa, sb in copies(question, answer):
            targets = (q_owner if source == "question" else a_owner)[sa:sb]
            look[a_owner[a] - 1:a_owner[b - 1], sorted(set(targets))] = True


def make_batch(processor, rng: random.Random, batch_size: int, description_rate: float = 0.8,
               max_questions: int = 3, evidence=(evidence_spans,),
               copies=TEXT_EVIDENCE) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """A right-padded batch of fresh training chats with their images.

    Returns the model inputs, the patch labels (``PatchProbe``) and a
    ``(batch, groups, seq, seq)`` bool mask for ``LookGuide``: one group per
    function in ``evidence`` (``mark_evidence``: row ``t`` marks the image tokens of
    the cells that the answer being written at position ``t`` depends on), then one
    per function in ``copies`` (``mark_copies``: the words being read, e.g. copied).
    """
    tokenizer = processor.tokenizer
    scenes = [make_scene(rng.randrange(VAL_OFFSET)) for _ in range(batch_size)]
    chats = [conversation(s, rng, description_rate, max_questions) for s in scenes]
    encoded = [encode_chat(tokenizer, turns) for turns in chats]
    width = max(len(ids) for ids, _, _ in encoded)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _, _ in encoded])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab, _ in encoded])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _, _ in encoded])
    pixels = processor.image_processor([render(s) for s in scenes], return_tensors="pt")["pixel_values"]
    patch = torch.stack([patch_labels(s) for s in scenes])
    look = torch.zeros(batch_size, len(evidence) + len(copies), width, width, dtype=torch.bool)
    for b, (scene, turns, (ids, _, spans)) in enumerate(zip(scenes, chats, encoded)):
        owners = char_tokens(tokenizer, turns)
        for g, fn in enumerate(evidence):
            mark_evidence(look[b, g], ids, turns, spans, owners, scene, tokenizer.image_token_id, fn)
        for g, fn in enumerate(copies, len(evidence)):
            mark_copies(look[b, g], turns, owners, fn)
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}
    return batch, patch, look


class LookGuide:
    """Training-only supervision of where some attention heads look.

    While the model writes an answer, the chosen heads of one language-model
    layer are trained to put their attention on the image tokens of the cells
    the answer depends on (``data.evidence_spans``): the cell named in "What is
    in the top left?", the cell of the object named in "Where is the red
    circle?", each object of a relation while its clause is written, each square
    while its clause of "How many squares?" is written, each object while its
    sentence of the description is written. Further groups of heads can be
    guided to words instead (``make_batch``'s ``copies``). The loss is ``-log`` of the attention
    mass on those tokens, recomputed from the layer's own query/key projections
    (so the model's fast attention kernel is untouched).

    Why: descriptions list cells in a fixed order, and the model learned to read
    them by *position* (its heads scan the image in raster order whatever cell
    name it has just written); nothing in the answer loss alone made it learn to
    *find* a cell or an object by content within the training budget
    (question-answer accuracy stayed at 0.57-0.63 in every variant tried).
    """

    def __init__(self, model, layer: int, groups: list[list[int]]):
        self.attn = model.model.language_model.layers[layer].self_attn
        self.groups = [torch.tensor(heads) for heads in groups]  # group g learns look[:, g]
        self.captured = {}
        self.hook = self.attn.register_forward_pre_hook(self._capture, with_kwargs=True)

    def remove(self) -> None:
        self.hook.remove()

    def _capture(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.captured = {"hidden": hidden, "rope": kwargs["position_embeddings"]}

    def loss(self, look: torch.Tensor) -> torch.Tensor:
        """Mean over head groups of ``-log`` attention mass on ``look[:, g]``
        (``look``: ``(batch, groups, seq, seq)``), averaged over heads and targeted rows."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        a, hidden = self.attn, self.captured["hidden"]
        shape = (*hidden.shape[:-1], -1, a.head_dim)
        q = a.q_proj(hidden).view(shape).transpose(1, 2)
        k = a.k_proj(hidden).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *self.captured["rope"])
        positions = torch.arange(q.shape[-2], device=q.device)
        losses = []
        for heads, target in zip(self.groups, look.unbind(1)):
            rows = target.any(-1)  # (B, T) positions with a target
            if not rows.any():
                continue
            # Only the query rows that have a target somewhere in the batch (a few verdicts,
            # the answers): the same loss as over all rows, at a fraction of the cost.
            keep = rows.any(0).nonzero().flatten()
            scores = (q[:, heads][:, :, keep] @ k[:, heads // a.num_key_value_groups].transpose(-1, -2)) * a.scaling
            causal = keep[:, None] >= positions[None, :]
            probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)  # (B, h, R, T)
            mass = (probs * target[:, keep][:, None]).sum(-1)  # (B, h, R)
            losses.append(-(mass + 1e-6).log().transpose(1, 2)[rows[:, keep]].mean())
        return torch.stack(losses).mean() if losses else hidden.new_zeros(())


@torch.no_grad()
def look_report(model, processor, seeds, layer: int = 2, heads: tuple[int, ...] = (2, 3)) -> dict[str, float]:
    """Per question kind, the geometric-mean attention mass that ``heads`` of
    ``layer`` put on the evidence cells while the reference answer is teacher-forced
    (what ``LookGuide`` trains; 1.0 = they look only at the right cells)."""
    guide, tokenizer = LookGuide(model, layer, [list(heads)]), processor.tokenizer
    masses = {}
    for seed in seeds:
        scene = make_scene(seed)
        pixels = processor.image_processor([render(scene)], return_tensors="pt")["pixel_values"]
        for kind in [*QA_KINDS, "describe"]:
            turns = [(DESCRIBE_PROMPT, describe(scene)) if kind == "describe" else ask(scene, kind, random.Random(seed))]
            if not evidence_spans(scene, *turns[0]):
                continue
            ids, _, spans = encode_chat(tokenizer, turns)
            look = torch.zeros(1, 1, len(ids), len(ids), dtype=torch.bool)
            mark_evidence(look[0, 0], ids, turns, spans, char_tokens(tokenizer, turns), scene,
                          tokenizer.image_token_id)
            model(input_ids=torch.tensor([ids]), pixel_values=pixels)
            masses.setdefault(kind, []).append(guide.loss(look).item())
    guide.remove()
    return {kind: math.exp(-sum(v) / len(v)) for kind, v in masses.items()}


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Image tokens as the language model sees them: last CLIP layer, CLS dropped,
    through the projector (LLaVA's ``vision_feature_layer=-1``, strategy ``default``)."""
    hidden = model.model.vision_tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1]
    return model.model.multi_modal_projector(hidden[:, 1:])


def train_vision(model, processor, aux_head, rng: random.Random, args, log) -> None:
    """Stage 1: the vision tower and projector learn the per-patch object labels."""
    params = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters(),
              *aux_head.parameters()]
    opt = torch.optim.AdamW(params, lr=args.vision_lr, betas=(0.9, 0.98), weight_decay=0.01)
    t0, running = time.time(), None
    bar = tqdm(range(args.vision_steps), desc="vision", mininterval=5)
    for step in bar:
        scenes = [make_scene(rng.randrange(VAL_OFFSET)) for _ in range(args.vision_batch_size)]
        pixels = processor.image_processor([render(s) for s in scenes], return_tensors="pt")["pixel_values"]
        patch = torch.stack([patch_labels(s) for s in scenes])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.vision_steps, args.vision_lr, args.warmup)
        loss = aux_head.loss(image_features(model, pixels), patch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        bar.set_postfix(aux=f"{running:.3f}")
        if (step + 1) % args.log_every == 0 or step + 1 == args.vision_steps:
            line = f"vision step={step + 1} aux={loss.item():.4f} avg_aux={running:.4f} elapsed={time.time() - t0:.0f}s"
            tqdm.write(line)
            log.write(line + "\n")
            log.flush()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(SHIPPED_MODEL_DIR))
    ap.add_argument("--vision-steps", type=int, default=2000, help="stage 1 (vision tower only) steps")
    ap.add_argument("--vision-batch-size", type=int, default=32)
    ap.add_argument("--vision-lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=1500, help="stage 2 (whole model on chats) steps")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--description-rate", type=float, default=0.6,
                    help="fraction of training chats that include the long description")
    ap.add_argument("--max-questions", type=int, default=3, help="questions per training chat: 1 to this many")
    ap.add_argument("--vision-lr-scale", type=float, default=0.3,
                    help="stage 2 learning rate of the pretrained vision tower, relative to --lr")
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--aux-weight", type=float, default=1.0, help="weight of the patch probe loss (object and cell of every image token) in stage 2")
    ap.add_argument("--look-weight", type=float, default=1.0,
                    help="weight of the LookGuide loss (where the --look-heads of --look-layer attend while answering)")
    ap.add_argument("--look-layer", type=int, default=2)
    ap.add_argument("--look-heads", type=lambda v: [int(h) for h in v.split(",")], nargs="+", default=[[2, 3], [4, 5], [0], [1]],
                    help="guided heads of --look-layer, one comma-separated group per look group of make_batch: "
                         "the image evidence, then the relation word, the first and the second number of a "
                         "relation's comparison (data.TEXT_EVIDENCE)")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads; the same seed and thread count reproduce the same weights")
    ap.add_argument("--init", help="start from this saved model instead of from scratch")
    ap.add_argument("--save-every", type=int, default=0, help="also save to OUT/checkpoint every N steps")
    ap.add_argument("--eval-n", type=int, default=20, help="validation scenes checked at the end")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # tiny gradients late in training must not hit slow denormal paths
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.init:  # continue training a saved model (same tokenizer and config)
        processor = LlavaProcessor.from_pretrained(args.init)
        model = LlavaForConditionalGeneration.from_pretrained(args.init)
    else:
        processor = build_processor(args.seed)
        model = build_model(processor.tokenizer, args.vision_layers)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params={n_params / 1e6:.2f}M vocab={len(processor.tokenizer)} steps={args.steps} "
          f"batch={args.batch_size} lr={args.lr} seed={args.seed}")

    aux_head = PatchProbe(model.config.text_config.hidden_size)
    log = (out / "train_log.txt").open("w")
    log.write(json.dumps(vars(args)) + "\n")
    model.train()
    t_start = time.time()
    if args.vision_steps:
        train_vision(model, processor, aux_head, rng, args, log)

    features = {}  # the projector output (image tokens as the LM sees them), captured by a hook
    model.model.multi_modal_projector.register_forward_hook(lambda mod, inp, out: features.update(x=out))
    # No weight decay on norms and biases (standard GPT practice); the pretrained
    # vision tower moves slower than the fresh language model.
    vision = set(map(id, model.model.vision_tower.parameters()))
    params = list(model.parameters()) + list(aux_head.parameters())
    groups = []
    for is_vision, scale in ((False, 1.0), (True, args.vision_lr_scale)):
        mine = [p for p in params if (id(p) in vision) == is_vision]
        groups += [{"params": [p for p in mine if p.dim() >= 2], "weight_decay": 0.01, "scale": scale},
                   {"params": [p for p in mine if p.dim() < 2], "weight_decay": 0.0, "scale": scale}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98))
    guide = LookGuide(model, args.look_layer, args.look_heads) if args.look_weight else None
    t0, running = time.time(), None
    bar = tqdm(range(args.steps), desc="train", mininterval=5)
    for step in bar:
        batch, patch, look = make_batch(processor, rng, args.batch_size, args.description_rate, args.max_questions)
        for group in opt.param_groups:
            group["lr"] = group["scale"] * lr_at(step, args.steps, args.lr, args.warmup)
        loss = model(**batch).loss
        aux = aux_head.loss(features["x"], patch)
        look_loss = guide.loss(look) if guide else torch.zeros(())
        opt.zero_grad(set_to_none=True)
        (loss + args.aux_weight * aux + args.look_weight * look_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        bar.set_postfix(loss=f"{running:.3f}")
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            # How much the model uses the image: loss on the same batch with the
            # images shifted by one sample (wrong image for every chat).
            with torch.no_grad():
                wrong = model(**{**batch, "pixel_values": batch["pixel_values"].roll(1, 0)}).loss.item()
            line = (f"step={step + 1} loss={loss.item():.4f} avg_loss={running:.4f} wrong_image_loss={wrong:.4f} aux={aux.item():.4f} look={look_loss.item():.4f} "
                    f"lr={opt.param_groups[0]['lr']:.2e} elapsed={time.time() - t0:.0f}s")
            tqdm.write(line)
            log.write(line + "\n")
            log.flush()
        if args.save_every and (step + 1) % args.save_every == 0:
            model.save_pretrained(out / "checkpoint")
            processor.save_pretrained(out / "checkpoint")

    train_time = time.time() - t_start
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    summary = f"done train_time={train_time:.0f}s final_avg_loss={running:.4f} saved={out}"
    print(summary)
    log.write(summary + "\n")
    if args.eval_n:
        from .evaluate import evaluate  # quick sanity check on unseen scenes
        result = evaluate(model, processor, range(VAL_OFFSET, VAL_OFFSET + args.eval_n), progress=False)
        line = f"quick_eval n={args.eval_n} accuracy={result['accuracy']:.3f} qa={result['qa']:.3f}"
        print(line)
        log.write(line + "\n")
    log.close()


if __name__ == "__main__":
    main()
