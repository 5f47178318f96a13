"""The app's first settings, its method lists and the example scenes (data, no UI)."""

from __future__ import annotations

import json
from pathlib import Path

import elastic
import viz
from elastic.policies import elastic_cache

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = ROOT / "assets" / "examples"
BENCHMARKS = ROOT / "docs" / "benchmarks.md"  # served as a file: Compare links to its measured speeds
BENCHMARKS_LINK = f"/gradio_api/file={BENCHMARKS}"
COMPARE_METHODS = ("full", "elastic", "h2o")
# The Explore tab's first settings; examples.json's ``default_right`` is measured with them.
DEFAULT_METHOD, DEFAULT_BUDGET, DEFAULT_MAX_NEW_TOKENS = "elastic", 0.5, 160
ABLATION_CHOICES = {"importance": elastic_cache.IMPORTANCE, "scope": elastic_cache.SCOPES,
                    "prefill": elastic_cache.PREFILLS, "decode": elastic_cache.DECODES,
                    "protect": elastic_cache.PROTECTS}
METHOD_CHOICES = [(viz.method_name(m), m) for m in elastic.METHODS]


def load_examples(folder: Path) -> list[dict]:
    """``examples.json`` of ``folder`` with absolute image paths ([] if there is none)."""
    path = Path(folder) / "examples.json"
    if not path.exists():
        return []
    return [dict(e, image=str(Path(folder) / e["image"])) for e in json.loads(path.read_text())]


def examples_label(examples: list[dict]) -> str:
    """The examples' heading; it says which ones the default settings (``DEFAULT_METHOD`` at
    ``DEFAULT_BUDGET``) get wrong, as ``examples.json`` records (``default_right``, checked by
    a test)."""
    wrong = [str(i + 1) for i, e in enumerate(examples) if e.get("default_right") is False]
    which = "all of them" if len(wrong) == len(examples) else ", ".join(wrong)
    setting = f"{viz.method_name(DEFAULT_METHOD)} at {DEFAULT_BUDGET:g}"
    note = f" ({setting} gets {which} wrong: see why in the figures)" if wrong else ""
    return "**Example scenes**: click one, then Send" + note
