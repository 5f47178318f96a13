"""Loading a model and its processor: the shipped tiny LLaVA or a hub LVLM.

``load_model()`` with no argument loads ``assets/tiny-llava`` on the CPU, offline.
Hub ids such as ``llava-hf/llava-1.5-7b-hf`` or ``Qwen/Qwen2-VL-2B-Instruct`` load on CUDA
in bf16 when a GPU is present (``device_map="auto"`` spreads them over several GPUs).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoProcessor, AutoTokenizer

from .scoring import attach

SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "assets" / "tiny-llava"

# model_type -> class name in transformers (anything else falls back to the Auto classes).
_MODEL_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}


class ModelLoadError(RuntimeError):
    """A model or processor could not be loaded; the message says which and why."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name_or_path: str | Path | None = None, device: str | None = None, dtype: torch.dtype | None = None):
    """Load ``(model, processor)`` ready for :func:`elastic.generate` (already attached).

    Parameters
    ----------
    name_or_path : str or Path, optional
        A local directory or a hub id; default: the shipped tiny LLaVA.
    device : str, optional
        ``"cpu"``, ``"cuda"`` (spread with ``device_map="auto"``) or ``"cuda:N"``;
        default: CUDA if available.
    dtype : torch.dtype, optional
        Default: bfloat16 on CUDA, float32 on CPU.
    """
    name = str(name_or_path or SHIPPED_MODEL)
    device = device or default_device()
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    try:
        config = AutoConfig.from_pretrained(name)
        cls_name = _MODEL_CLASSES.get(config.model_type)
        if cls_name:
            cls = getattr(transformers, cls_name)
        elif hasattr(config, "vision_config"):
            cls = transformers.AutoModelForImageTextToText
        else:
            cls = transformers.AutoModelForCausalLM
        kwargs = {"dtype": dtype, "attn_implementation": "sdpa"}
        if device == "cuda":
            kwargs["device_map"] = "auto"
        model = cls.from_pretrained(name, **kwargs)
        if device != "cuda":
            model = model.to(device)
        model.eval()
        processor = load_processor(name, config)
    except Exception as error:  # one clear message, whatever went wrong underneath
        hint = "" if Path(name).exists() else " (a hub id needs network access, or a local copy)"
        raise ModelLoadError(f"could not load model {name!r}{hint}: {type(error).__name__}: {error}") from error
    return attach(model), processor


def load_processor(name: str, config=None):
    """The model's processor; Qwen2-VL's is rebuilt without a video processor when
    torchvision is missing (its video processor needs torchvision)."""
    try:
        return AutoProcessor.from_pretrained(name)
    except Exception:
        config = config or AutoConfig.from_pretrained(name)
        if config.model_type not in ("qwen2_vl", "qwen2_5_vl"):
            if not hasattr(config, "vision_config"):
                return AutoTokenizer.from_pretrained(name)
            raise
        from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

        tokenizer = AutoTokenizer.from_pretrained(name)
        return Qwen2VLProcessor(
            image_processor=Qwen2VLImageProcessorPil.from_pretrained(name),
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=getattr(tokenizer, "chat_template", None),
        )
