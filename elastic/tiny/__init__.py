"""The embedded tiny LLaVA: synthetic scenes, training, evaluation.

Importing this package is cheap (no torch / transformers); use :func:`load`
for the shipped model, which loads through the same code path as any
``llava-hf`` checkpoint.
"""

from pathlib import Path

SHIPPED_MODEL_DIR = Path(__file__).resolve().parents[2] / "assets" / "tiny-llava"


def load(model_dir: str | Path = SHIPPED_MODEL_DIR):
    """Load ``(model, processor)`` with ``from_pretrained``; the model is in eval mode.

    Parameters
    ----------
    model_dir : str or Path
        A directory written by ``python -m elastic.tiny.train`` (default: the
        shipped model) or any LLaVA-1.5 checkpoint path / hub id.
    """
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    processor = LlavaProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    return model, processor
