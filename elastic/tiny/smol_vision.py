"""Stage 1 of ``train_smol``: make the 81 image tokens read as a short text about the scene.

The LM is pretrained on text, so the easiest image for it to read is one that *is* text:
image token ``9k + j`` should be SmolLM2's embedding of word ``j`` of cell ``k``'s nine
words (``slot_words``: "top left : large red circle , white background", then the top
middle, ...). Copying "large red circle" after "In the top left there is a" is then what
a pretrained LM already does with text in its context.

Three steps, all without the LM (cheap: ~0.5 s per step of 32 images on 2 cores):

1. **read** (``read_loss``): the tower, the tiny LLaVA's four layers plus ``ROUTE_LAYERS``
   new ones, learns to *classify* every image token into its slot word (cross-entropy over
   the slot vocabulary, through a throw-away linear head). A word of cell ``k`` sits on
   patch row ``k``, which mostly shows other cells, so the first new layer must route cell
   ``k`` to patch row ``k``: its heads are told where to look (``route_targets``, the
   ``-log`` of their attention mass on cell ``k``'s 3x3 patches). Without that guide, and
   with a squared distance to the word embeddings instead of a classifier, 800 steps left
   the object words at 16-22% (docs/embedded-model.md).
2. **map** (``projector_from_classifier``): LLaVA's projector (linear, GELU, linear) is set
   so that its first layer *is* the classifier, shifted so mostly the winning class is
   positive, and its second layer writes that class's word embedding.
3. **align** (``align_loss``): the projector alone is fine-tuned to put each token on its
   word's embedding and away from the other slot words' (squared distance plus a
   cross-entropy over the slot vocabulary), starting from the map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import BACKGROUNDS, CELLS, COLOURS, SHAPES, SIZES
from .train import GRID, image_features

ROUTE_LAYERS = 2  # CLIP layers added on top of the tiny LLaVA's four
OBJECT_WORDS = {*SIZES, *COLOURS, *SHAPES}


def slot_words(scene) -> list[str]:
    """The word each of the 81 image tokens reads as (raster order).

    Image token ``9k + j`` is word ``j`` of cell ``k``'s nine words, e.g. "top left :
    large red circle , white background" or "the center : empty empty empty , grey
    background". A cell's words therefore sit in patch row ``k`` of the 9x9 patch grid,
    in reading order, like a text. (A layout that kept every word inside its own cell's
    3x3 patches interleaves the three cells of a row in raster order; the LM then
    learned the answer format but could not read the cells, docs/embedded-model.md.)"""
    words = []
    for cell in range(9):
        name = CELLS[cell].split()
        o = scene.at(cell)
        words += (["the"] if len(name) == 1 else []) + name + [":"]
        words += [o.size, o.colour, o.shape] if o else ["empty"] * 3
        words += [",", scene.background, "background"]
    return words


def slot_vocabulary(tokenizer) -> tuple[list[str], torch.Tensor]:
    """Every word ``slot_words`` can produce, and its SmolLM2 token id (each is one token)."""
    words = sorted({"the", ":", ",", "background", "empty", *OBJECT_WORDS, *BACKGROUNDS,
                    *(w for c in CELLS for w in c.split())})
    ids = []
    for w in words:
        encoded = tokenizer.encode(w if w in ":," else " " + w, add_special_tokens=False)
        assert len(encoded) == 1, (w, encoded)
        ids.append(encoded[0])
    return words, torch.tensor(ids)


def slot_classes(words: list[str], scenes) -> torch.Tensor:
    """``(batch, 81)`` indices into ``words`` of every image token's slot word."""
    index = {w: i for i, w in enumerate(words)}
    return torch.tensor([[index[w] for w in slot_words(s)] for s in scenes])


def object_mask(scenes) -> torch.Tensor:
    """``(batch, 81)`` bool: the image tokens whose slot word is an object word (size,
    colour, shape), the words the questions are about."""
    return torch.tensor([[w in OBJECT_WORDS for w in slot_words(s)] for s in scenes])


def route_targets() -> torch.Tensor:
    """``(81, 82)`` bool: the tower positions (CLS first) image token ``9k + j`` should look
    at in the first routing layer: the 3x3 patches of cell ``k``."""
    targets = torch.zeros(GRID * GRID, GRID * GRID + 1, dtype=torch.bool)
    for token in range(GRID * GRID):
        row, col = divmod(token // GRID, 3)
        for r in range(3 * row, 3 * row + 3):
            targets[token, 1 + GRID * r + 3 * col:1 + GRID * r + 3 * col + 3] = True
    return targets


def tower_tokens(model, pixel_values, with_attention: bool = False):
    """The tower's last hidden states without CLS (what the projector reads) and, with
    ``with_attention``, the first routing layer's attention ``(batch, heads, 81, 82)``."""
    tower = model.model.vision_tower
    out = tower(pixel_values=pixel_values, output_hidden_states=True, output_attentions=with_attention)
    tokens = out.hidden_states[-1][:, 1:]
    if not with_attention:
        return tokens, None
    first_route = tower.config.num_hidden_layers - ROUTE_LAYERS
    return tokens, out.attentions[first_route][:, :, 1:]


def read_loss(model, head: torch.nn.Linear, pixel_values, classes, route_weight: float = 1.0):
    """Cross-entropy of the linear ``head`` on every image token's slot word, plus
    ``route_weight`` times the routing guide. Returns ``(loss, ce, route, logits)``."""
    tokens, attention = tower_tokens(model, pixel_values, with_attention=True)
    logits = head(tokens)
    ce = F.cross_entropy(logits.flatten(0, 1), classes.flatten())
    route = -(attention * route_targets()).sum(-1).clamp_min(1e-6).log().mean()
    return ce + route_weight * route, ce, route, logits


@torch.no_grad()
def projector_from_classifier(model, head: torch.nn.Linear, word_ids: torch.Tensor, pixel_values) -> None:
    """Set the projector so that it writes the embedding of ``head``'s winning word.

    ``linear_1``'s first ``V`` rows are the head's logits minus a threshold halfway
    between the winner and the runner-up (median over a batch of ``pixel_values``), so
    after GELU mostly the winner is positive; its other rows are zero. ``linear_2``
    maps class ``i`` to word ``i``'s embedding, divided by the winner's median activation
    so the token has about an embedding's norm. The result points the right way but its
    norm follows the winner's logit (object words' logits are lower than the structure
    words'), so ``align_loss`` fine-tunes it."""
    proj = model.model.multi_modal_projector
    embed = model.model.language_model.embed_tokens.weight
    tokens, _ = tower_tokens(model, pixel_values)
    top2 = head(tokens).topk(2, dim=-1).values.flatten(0, 1)
    shift = ((top2[:, 0] + top2[:, 1]) / 2).median()
    active = F.gelu(top2[:, 0] - shift).median()
    n = len(word_ids)
    proj.linear_1.weight.zero_()
    proj.linear_1.bias.zero_()
    proj.linear_1.weight[:n] = head.weight
    proj.linear_1.bias[:n] = head.bias - shift
    proj.linear_2.weight.zero_()
    proj.linear_2.bias.zero_()
    proj.linear_2.weight[:, :n] = embed[word_ids].T / active


def align_loss(model, pixel_values, classes: torch.Tensor, word_ids: torch.Tensor, ce_weight: float = 1.0) -> torch.Tensor:
    """How far the image tokens are from their slot words' embeddings: the mean squared
    distance (in units of the embedding table's variance) plus a cross-entropy over the
    slot vocabulary with the negative squared distances as logits, weighted ``ce_weight``
    (0: the squared distance alone, as in run 4).

    ``classes`` ``(batch, 81)`` indexes ``word_ids`` (the slot words' token ids). The
    squared distance alone settles between confusable words (object words nearest to
    their own embedding for 0.885 of tokens after 150 steps); the cross-entropy pushes
    each token towards its word *and away from the others* (0.974 after 400 steps, with
    the classifier it starts from at 0.981; docs/embedded-model.md, run 5)."""
    embed = model.model.language_model.embed_tokens.weight.detach()
    features = image_features(model, pixel_values)
    mse = F.mse_loss(features, embed[word_ids[classes]]) / embed.var()
    if not ce_weight:
        return mse
    distance = torch.cdist(features.flatten(0, 1), embed[word_ids])
    return mse + ce_weight * F.cross_entropy(-distance ** 2, classes.flatten())


@torch.no_grad()
def word_accuracy(model, pixel_values, targets: torch.Tensor, scenes) -> tuple[float, float]:
    """How often an image token's nearest vocabulary word is its slot word (all tokens), and
    how often a token that should read as an object word (size, colour, shape) does."""
    embed = model.model.language_model.embed_tokens.weight
    nearest = torch.cdist(image_features(model, pixel_values), embed[None]).argmin(-1)
    hit = nearest == targets
    return hit.float().mean().item(), hit[object_mask(scenes)].float().mean().item()
