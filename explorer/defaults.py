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
# The Explore tab's first settings: the first example's (its ``budget`` in examples.json, where
# Elastic Cache gives the full cache's answer; tests/test_shipped_model.py checks both).
DEFAULT_METHOD, DEFAULT_BUDGET, DEFAULT_MAX_NEW_TOKENS = "elastic", 0.8, 160
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


def example_caption(number: int, example: dict) -> str:
    """A thumbnail's caption: what the example shows, as ``examples.json`` says (measured:
    ``elastic_right`` at the example's ``budget``, checked by tests/test_shipped_model.py)."""
    return f"{number}. {example.get('caption') or example['prompt']}"
