"""Which heads a description reads the image with. Per language-model layer and head:
the attention mass on the described cell's image tokens at the position that predicts
an object's colour (reference description teacher-forced), first 20 validation scenes.

    ./run.sh python docs/tiny-experiments/description_heads.py assets/tiny-llava
"""
import sys

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor
from elastic.tiny.data import VAL_OFFSET, describe, make_scene, render, DESCRIBE_PROMPT, COLOURS
from elastic.tiny.train import encode_chat, patch_cells
torch.set_num_threads(2)
m = LlavaForConditionalGeneration.from_pretrained(sys.argv[1], attn_implementation="eager").eval()
p = LlavaProcessor.from_pretrained(sys.argv[1]); tok = p.tokenizer
cells = patch_cells(); mass = torch.zeros(4, 8); n = 0
for i in range(20):
    sc = make_scene(VAL_OFFSET + i)
    ids, _, (span,) = encode_chat(tok, [(DESCRIBE_PROMPT, describe(sc))])
    img = torch.tensor([j for j, t in enumerate(ids) if t == tok.image_token_id])
    pix = p.image_processor([render(sc)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        att = m(input_ids=torch.tensor([ids]), pixel_values=pix, output_attentions=True).attentions
    objs = iter(sc.objects)
    for t in range(span[0], span[1] - 1):
        word = tok.decode([ids[t + 1]]).strip()
        prev = tok.decode(ids[t - 1:t + 1])
        if word in COLOURS and ("small" in prev or "large" in prev):
            o = next(objs); target = img[cells == o.cell]
            for L in range(4):
                mass[L] += att[L][0, :, t, target].sum(-1)
            n += 1
print("objects", n)
for L in range(4):
    print(f"layer {L}: " + " ".join(f"{v:.2f}" for v in (mass[L] / n).tolist()))
