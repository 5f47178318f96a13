"""Evaluation samples: synthetic validation scenes, MM-Vet JSON and LLaVA conversation JSON.

Every loader returns a list of :class:`Sample`: a chat (transformers message format, the
image block in the first user turn) that ends with a user turn, and the reference answer
that follows it. The two JSON formats are the ones the paper evaluated on:

* MM-Vet style: records ``{"image", "question", "answer"}``, as a list or as a dict keyed
  by sample id (the shape of ``mm-vet.json``; its ``imagename`` key is accepted too);
* LLaVA conversation style: records ``{"image", "conversations": [{"from": "human",
  "value"}, {"from": "gpt", "value"}, ...]}`` (``llava_detail_*``, ``llava_instruct_*``);
  the last ``gpt`` turn is the reference, earlier turns are chat history.

Malformed records raise :class:`DatasetError` naming the file, the record and the problem.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

IMAGE_MARK = "<image>"
SYNTHETIC = ("synthetic", "synthetic-qa")


class DatasetError(ValueError):
    """A data file or record cannot be used; the message says where and why."""


@dataclass
class Sample:
    """One evaluation item.

    Attributes
    ----------
    id : str
    messages : list[dict]
        The chat up to (not including) the reference answer; ends with a user turn.
    answer : str
        The reference answer (scored by PPL).
    image : PIL image, path or None
        Loaded lazily by :meth:`load_image` (datasets may hold thousands of paths).
    """

    id: str
    messages: list[dict]
    answer: str
    image: Image.Image | Path | None = None
    meta: dict = field(default_factory=dict)

    def load_image(self) -> Image.Image | None:
        if self.image is None or isinstance(self.image, Image.Image):
            return self.image
        with Image.open(self.image) as opened:
            return opened.convert("RGB")

    def with_answer(self, text: str | None = None) -> list[dict]:
        """The chat with the reference (or ``text``) as the final assistant turn."""
        reply = self.answer if text is None else text
        return self.messages + [{"role": "assistant", "content": [{"type": "text", "text": reply}]}]


def _user(text: str, with_image: bool) -> dict:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


# ---------------------------------------------------------------- synthetic scenes

def synthetic(n: int, kind: str = "synthetic", first_seed: int | None = None) -> list[Sample]:
    """``n`` validation scenes of the shipped model's generator (never seen in training).

    ``kind="synthetic"`` asks for the long description (the analogue of the paper's
    LLaVA-Description set, long answers so the decode rule matters); ``"synthetic-qa"``
    asks one short question per scene.
    """
    from .tiny import data  # lazy: keeps this module importable without the tiny package's deps

    if kind not in SYNTHETIC:
        raise DatasetError(f"unknown synthetic set {kind!r}; choose one of {', '.join(SYNTHETIC)}")
    start = data.VAL_OFFSET if first_seed is None else first_seed
    samples = []
    for seed in range(start, start + n):
        scene = data.make_scene(seed)
        if kind == "synthetic":
            question, answer = data.DESCRIBE_PROMPT, data.describe(scene)
        else:
            kind_name = data.QA_KINDS[seed % len(data.QA_KINDS)]
            question, answer = data.ask(scene, kind_name, random.Random(seed))
        samples.append(Sample(id=f"scene-{seed}", messages=[_user(question, True)], answer=answer,
                              image=data.render(scene), meta={"seed": seed}))
    return samples


# ---------------------------------------------------------------- JSON files

def _records(path: Path) -> list[tuple[str, dict]]:
    """``(id, record)`` pairs from a JSON list or an id-keyed dict."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DatasetError(f"{path}: is a folder, not a JSON file") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not a UTF-8 text file (expected JSON)") from None
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}: not valid JSON ({error})") from None
    except RecursionError:
        raise DatasetError(f"{path}: JSON nested too deeply to read") from None
    if isinstance(raw, dict):
        items = list(raw.items())
    elif isinstance(raw, list):
        items = [(None, r) for r in raw]
    else:
        raise DatasetError(f"{path}: expected a list of records or a dict of records, got {type(raw).__name__}")
    if not items:
        raise DatasetError(f"{path}: holds no records")
    out = []
    for i, (key, record) in enumerate(items):
        where = f"{path.name}, record {i}" + (f" ({key!r})" if key is not None else "")
        if not isinstance(record, dict):
            raise DatasetError(f"{where}: expected an object, got {type(record).__name__}")
        ident = record.get("id", record.get("question_id", key if key is not None else i))
        out.append((str(ident), record))
    return out


def detect_format(record: dict) -> str:
    """``"llava"`` for conversation records, ``"mmvet"`` for question/answer records."""
    if "conversations" in record:
        return "llava"
    if "question" in record or "answer" in record:
        return "mmvet"
    raise DatasetError(
        f"cannot tell the format of a record with keys {sorted(record)}: expected MM-Vet style "
        "('image', 'question', 'answer') or LLaVA style ('image', 'conversations')"
    )


def _text(record: dict, key: str, where: str, hint: str) -> str:
    if key not in record:
        raise DatasetError(f"{where}: missing key {key!r} ({hint})")
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
    return value


def _image_path(record: dict, where: str, image_dir: Path, hint: str, keys=("image",)) -> Path:
    key = next((k for k in keys if k in record), None)
    if key is None:
        raise DatasetError(f"{where}: missing key 'image' ({hint})")
    name = record[key]
    if not isinstance(name, str) or not name.strip():
        raise DatasetError(f"{where}: {key!r} must be an image file name, got {name!r}")
    path = image_dir / name
    if not path.resolve().is_relative_to(image_dir.resolve()):
        raise DatasetError(f"{where}: image {name!r} is outside the image folder {str(image_dir)!r}")
    if not path.is_file():
        raise DatasetError(f"{where}: image {str(path)!r} not found (set --image-dir to the images' folder)")
    return path


def _strip_mark(text: str) -> str:
    return text.replace(IMAGE_MARK, "").strip()


def _located(path, image_dir) -> tuple[Path, list[tuple[str, dict, str]]]:
    """The image folder and ``(id, record, where)`` for every record of a JSON file, read once;
    ``where`` names the record in error messages."""
    path = Path(path)
    records = [(ident, record, f"{path.name}, record {i} (id {ident!r})")
               for i, (ident, record) in enumerate(_records(path))]
    return (Path(image_dir) if image_dir else path.parent), records


def load_mmvet(path, image_dir=None) -> list[Sample]:
    """MM-Vet style records ``{"image", "question", "answer"}`` (list or id-keyed dict)."""
    return _mmvet_samples(*_located(path, image_dir))


def _mmvet_samples(image_dir: Path, records) -> list[Sample]:
    hint = "MM-Vet records need 'image', 'question' and 'answer'"
    samples = []
    for ident, record, where in records:
        question = _strip_mark(_text(record, "question", where, hint))
        answer = _text(record, "answer", where, hint)
        image = _image_path(record, where, image_dir, hint, keys=("image", "imagename"))
        samples.append(Sample(id=ident, messages=[_user(question, True)], answer=answer, image=image))
    return samples


def load_llava(path, image_dir=None) -> list[Sample]:
    """LLaVA conversation records; one sample per record, its last ``gpt`` turn the reference."""
    return _llava_samples(*_located(path, image_dir))


def _llava_samples(image_dir: Path, records) -> list[Sample]:
    hint = "LLaVA records need 'image' and 'conversations' of alternating human/gpt turns"
    samples = []
    for ident, record, where in records:
        turns = record.get("conversations")
        if not isinstance(turns, list) or len(turns) < 2:
            raise DatasetError(f"{where}: 'conversations' must be a list of at least 2 turns ({hint})")
        messages = []
        for j, turn in enumerate(turns):
            expected = "human" if j % 2 == 0 else "gpt"
            if not isinstance(turn, dict) or turn.get("from") != expected:
                got = turn.get("from") if isinstance(turn, dict) else turn
                raise DatasetError(f"{where}: turn {j} must be from {expected!r}, got {got!r} ({hint})")
            value = _text(turn, "value", f"{where}, turn {j}", hint)
            messages.append(_user(_strip_mark(value), j == 0) if expected == "human" else _assistant(value))
        if len(turns) % 2:
            raise DatasetError(f"{where}: the last turn must be from 'gpt' (the reference answer)")
        image = _image_path(record, where, image_dir, hint)
        answer = messages.pop()["content"][0]["text"]
        samples.append(Sample(id=ident, messages=messages, answer=answer, image=image))
    return samples


def load(data: str = "synthetic", image_dir=None, samples: int | None = None) -> list[Sample]:
    """Samples from ``data``: ``synthetic``, ``synthetic-qa`` or a JSON file of either format.

    ``samples`` keeps the first N (the synthetic sets are generated, N defaults to 50).
    """
    if samples is not None and (isinstance(samples, bool) or int(samples) != samples or samples < 1):
        raise DatasetError(f"samples must be a whole number >= 1, got {samples!r}")
    if data in SYNTHETIC:
        return synthetic(50 if samples is None else samples, data)
    image_dir, records = _located(data, image_dir)
    try:
        fmt = detect_format(records[0][1])
    except DatasetError as error:
        raise DatasetError(f"{Path(data).name}, record 0: {error}") from None
    loaded = (_llava_samples if fmt == "llava" else _mmvet_samples)(image_dir, records)
    return loaded if samples is None else loaded[:samples]
