"""Token spans (system / image / instruction) and image grids of a prompt, for every image layout.

Vision-language families lay an image out in the prompt in different ways:

- one run of image tokens per image (LLaVA-1.5, Qwen2/2.5/3-VL, Qwen3.5, GLM-4V, Gemma 3);
- tiles, each a run of image tokens, separated by row / tile markers and closed by a
  global image or thumbnail (SmolVLM, Idefics3, LFM2-VL, Llama 4), or back to back (InternVL);
- a base image and an anyres grid whose rows end with a newline token that is itself an
  image token (LLaVA-NeXT, LLaVA-OneVision);
- rows of image tokens separated by ``[IMG_BREAK]`` (Mistral 3 / Pixtral).

How spans represent this (the contract every reader of ``Trace.spans`` relies on):

- ``spans["image"]`` is ONE ``(start, end)`` range over the whole image region: from the
  first image token (or the tile marker that opens the first tile) to the last image token.
  Markers and breaks inside it (``<row_1_col_2>``, ``[IMG_BREAK]``, tile separators) are
  image positions. With several images in one prompt the range runs from the first image
  to the last, so text between two images counts as image: the spans stay three
  contiguous ranges (system, image, instruction) that every existing reader understands.
  Delimiters outside the first and last image token (``<vision_start>``, ``<vision_end>``,
  ``<start_of_image>``, ``[IMG_END]``) stay text, as for LLaVA and Qwen2-VL before.
- ``image_tiles`` lists every tile or image grid exactly: :class:`ImageTile` with its rows,
  cols and the row-major prompt positions of its cells (markers, breaks and newline
  columns are not cells). It comes from the model's own inputs (``image_grid_thw``,
  ``image_sizes`` and the anyres pinpoints, ``spatial_shapes``, the config's tokens per tile).
- ``image_grid`` stays ``(rows, cols)`` for a prompt with exactly one grid (LLaVA-1.5, one
  Qwen image), else None.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

# Families whose first tile is opened by a marker that belongs to the image: SmolVLM and
# Idefics3 write <row_1_col_1> (or <global-img> for an unsplit image) before the first image token.
MARKER_FIRST = ("smolvlm", "idefics3")
# LFM2-VL writes <|img_row_1_col_1|> before the first tile only when the image is split and its
# special tokens are on; then exactly one marker separates every two tiles.
MARKER_BETWEEN = ("lfm2_vl",)

# How to give a policy the spans it needs; its error messages end with this.
SPANS_HOW = ("use elastic.attach(model) (plain model.generate then finds them) or elastic.generate, "
             "or call cache.annotate(spans=elastic.prompt_spans(inputs, model)) before the prefill")


class ImageTile(NamedTuple):
    """One grid of image tokens: a whole image, a tile, or a global / base view.

    Attributes
    ----------
    rows, cols : int
    positions : tuple[int, ...]
        ``rows * cols`` prompt positions of the cells, row-major.
    kind : str
        ``"image"`` (the whole image), ``"tile"``, ``"global"`` / ``"thumbnail"`` (the whole
        image after its tiles), ``"base"`` / ``"anyres"`` (LLaVA-NeXT's two views).
    """

    rows: int
    cols: int
    positions: tuple[int, ...]
    kind: str = "image"


def image_token_id(model) -> int | None:
    config = getattr(model, "config", model)
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def _config(model):
    return getattr(model, "config", model)


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def _side(size, patch) -> int:
    return int(_first(size)) // int(_first(patch))


def _runs(positions: list[int]) -> list[list[int]]:
    """Split ascending positions into runs of consecutive ones."""
    runs: list[list[int]] = []
    for p in positions:
        if runs and p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def _anyres_shapes(config, image_sizes) -> list[tuple[int, int, int, str]]:
    """LLaVA-NeXT / OneVision: per image, the base view then the unpadded anyres grid plus a
    newline column (the model's own helpers decide the grid)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    shapes = []
    for size in image_sizes.tolist():
        tiles_h, tiles_w = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, vision.image_size)
        rows, cols = unpad_image(torch.empty(0, tiles_h * side, tiles_w * side), torch.tensor(size)).shape[1:]
        if config.model_type == "llava_onevision":  # at most 9 tiles' worth, else scaled down (anyres_max_9)
            limit = int(getattr(config, "vision_aspect_ratio", "anyres_max_9").strip("anyres_max_"))
            ratio = math.sqrt(rows * cols / (limit * side**2))
            if ratio > 1.1:
                rows, cols = int(rows // ratio), int(cols // ratio)
        shapes += [(side, side, side, "base"), (rows, cols, cols + 1, "anyres")]
    return shapes


def _tile_shapes(config, inputs: dict, n_tokens: int) -> list[tuple[int, int, int, str]] | None:
    """``(rows, cols, stride, kind)`` of every grid in prompt order (a grid takes ``rows * stride``
    image tokens; ``stride > cols`` for a newline column), or None when the family is unknown."""
    kind = config.model_type
    if inputs.get("image_grid_thw") is not None:  # Qwen2/2.5/3-VL, Qwen3.5, GLM-4V
        merge = config.vision_config.spatial_merge_size
        return [(int(t) * int(h) // merge, int(w) // merge, int(w) // merge, "image")
                for t, h, w in inputs["image_grid_thw"].tolist()]
    if kind in ("llava_next", "llava_onevision") and inputs.get("image_sizes") is not None:
        return _anyres_shapes(config, inputs["image_sizes"])
    if kind == "mistral3" and inputs.get("image_sizes") is not None:
        unit = config.vision_config.patch_size * config.spatial_merge_size
        return [(h // unit, w // unit, w // unit, "image") for h, w in inputs["image_sizes"].tolist()]
    if kind == "lfm2_vl" and inputs.get("spatial_shapes") is not None:
        factor = config.downsample_factor
        return [(h // factor, w // factor, w // factor, "tile") for h, w in inputs["spatial_shapes"].tolist()]
    side = None
    if kind == "gemma3":
        side = math.isqrt(config.mm_tokens_per_image)
    elif kind in ("smolvlm", "idefics3"):
        side = _side(config.vision_config.image_size, config.vision_config.patch_size) // config.scale_factor
    elif kind == "internvl":
        side = int(_side(config.vision_config.image_size, config.vision_config.patch_size) * config.downsample_ratio)
    elif kind == "llama4":
        vision = config.vision_config
        side = int(_side(vision.image_size, vision.patch_size) * vision.pixel_shuffle_ratio)
    if side is None or side < 1 or n_tokens % (side * side):
        return None
    return [(side, side, side, "image" if kind == "gemma3" else "tile")] * (n_tokens // (side * side))


def _name_global_tiles(tiles: list[ImageTile], gap: int) -> list[ImageTile]:
    """In families that end a split image with a whole-image view, name the last tile of each
    group of tiles (tiles at most ``gap`` tokens apart) ``global``."""
    named, group = [], []

    def flush():
        for k, tile in enumerate(group):
            named.append(tile._replace(kind="global") if len(group) > 1 and k == len(group) - 1 else tile)
        group.clear()

    for tile in tiles:
        if group and tile.positions[0] - group[-1].positions[-1] - 1 > gap:
            flush()
        group.append(tile)
    flush()
    return named


def image_tiles(inputs: dict, model) -> list[ImageTile]:
    """Every grid of image tokens in the prompt (row 0 of ``inputs``), in prompt order.

    Parameters
    ----------
    inputs : dict
        The model inputs (``input_ids`` and the image tensors the processor returned).
    model : the model or its config
        The config gives the image token id and the family's tile geometry.

    Returns
    -------
    list[ImageTile]
        Empty for a text-only prompt. When the family's layout is unknown, or the inputs do
        not say how the image tokens split, each square run of image tokens is one grid.
    """
    config = _config(model)
    token = image_token_id(config)
    if token is None:
        return []
    where = (inputs["input_ids"][0] == token).nonzero().flatten().tolist()
    if not where:
        return []
    shapes = _tile_shapes(config, inputs, len(where))
    if shapes is None or sum(rows * stride for rows, _, stride, _ in shapes) != len(where):
        # Unknown layout: every run of image tokens that is a square is one image (LLaVA-1.5).
        return [ImageTile(math.isqrt(len(run)), math.isqrt(len(run)), tuple(run))
                for run in _runs(where) if math.isqrt(len(run)) ** 2 == len(run)]
    tiles, at = [], 0
    for rows, cols, stride, kind in shapes:
        taken = where[at: at + rows * stride]
        at += rows * stride
        tiles.append(ImageTile(rows, cols, tuple(taken[r * stride + c] for r in range(rows) for c in range(cols)), kind))
    if config.model_type == "internvl":  # one image = one run of tiles, the last one the thumbnail
        tiles = _name_global_tiles(tiles, gap=0)
        tiles = [t._replace(kind="thumbnail") if t.kind == "global" else t for t in tiles]
    elif config.model_type in MARKER_FIRST + ("llama4",):
        # Every image ends with its global view behind one marker (<global-img>, Llama 4's <|image|>):
        # the token before the prompt's last tile is that marker, and it opens every global view.
        ids = inputs["input_ids"][0]
        marker = ids[tiles[-1].positions[0] - 1]
        tiles = [t._replace(kind="global") if ids[t.positions[0] - 1] == marker else t for t in tiles]
    elif config.model_type == "lfm2_vl":
        tiles = [t._replace(kind="thumbnail") if t.kind == "global" else t for t in _name_global_tiles(tiles, gap=1)]
    return tiles


def prompt_spans(inputs: dict, model) -> dict[str, tuple[int, int]]:
    """Token-type spans ``name -> (start, end)`` (end exclusive) of one prompt.

    ``system`` is the text before the first image, ``image`` the whole image region (see the
    module docstring: every image token, marker and break between the first image token and
    the last), ``instruction`` the text after it; a text-only prompt is all ``instruction``.
    Empty spans are left out. Pass them to a cache used through plain ``model.generate``::

        cache.annotate(spans=elastic.prompt_spans(inputs, model))

    Parameters
    ----------
    inputs : dict
        Model inputs of one prompt (``input_ids`` of shape ``[1, T]``; row 0 is read).
    model : the model or its config
    """
    ids = inputs["input_ids"][0]
    T = len(ids)
    token = image_token_id(model)
    where = (ids == token).nonzero().flatten().tolist() if token is not None else []
    if not where:
        return {"instruction": (0, T)}
    start, end = where[0], where[-1] + 1
    kind = _config(model).model_type
    if kind in MARKER_FIRST and start > 0:
        start -= 1
    elif kind in MARKER_BETWEEN and start > 0:
        first = _runs(where)
        if len(first) > 1 and first[1][0] - first[0][-1] == 2:  # tiles one marker apart: split with markers
            start -= 1
    spans = {"system": (0, start), "image": (start, end), "instruction": (end, T)}
    return {name: span for name, span in spans.items() if span[1] > span[0]}


def prompt_annotations(model, inputs: dict) -> dict:
    """Everything the trace records about a prompt: ``spans``, ``image_grid`` (rows, cols of
    the only grid, else None) and ``image_tiles`` (every grid)."""
    tiles = image_tiles(inputs, model)
    grid = (tiles[0].rows, tiles[0].cols) if len(tiles) == 1 else None
    return {"spans": prompt_spans(inputs, model), "image_grid": grid, "image_tiles": tiles}


def annotating_hook(model):
    """Forward pre-hook (installed by :func:`elastic.attach`): a cache handed to plain
    ``model.generate`` without spans gets them from the prompt it sees at the prefill, so
    policies that read spans (``protect="instruction"``, VL-Cache, LOOK-M's text prior) work
    there as under :func:`elastic.generate`. Annotations set before the prefill win; a batch
    whose rows have different spans is left unannotated (those policies then refuse it).
    Only the spans: ``generate`` encodes the images before the forward, so the grids' inputs
    (``image_grid_thw``, ...) never reach it; ``cache.annotate(**elastic.prompt_annotations(
    model, inputs))`` adds the grids."""

    def hook(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        ids = kwargs.get("input_ids")
        if not hasattr(cache, "annotate") or getattr(cache, "spans", None) is not None or ids is None:
            return None
        if cache.get_seq_length() != 0 or ids.dim() != 2:  # only a prefill shows the whole prompt
            return None
        rows = [prompt_spans({"input_ids": ids[b:b + 1]}, model) for b in range(len(ids))]
        if all(spans == rows[0] for spans in rows):
            cache.annotate(spans=rows[0])
        return None

    return hook
