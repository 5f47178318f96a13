"""The model's own processor, with or without torchvision.

transformers' processors of Qwen2/2.5/3-VL, Qwen3.5, GLM-4V, InternVL, SmolVLM and
LLaVA-OneVision also build a *video* processor, and every video processor needs torchvision.
torchvision cannot be used with a CPU build of torch (PyPI's wheel is built against the CUDA
torch), so on a CPU-only machine these processors do not load. What they do for images needs
only the family's PIL image processor (``Qwen2VLImageProcessorPil``, ``SmolVLMImageProcessorPil``,
``GotOcr2ImageProcessorPil`` for InternVL, ...) and the tokenizer. So, without torchvision,
:func:`load_processor` builds the *same* processor class without its video processor: the
placeholder expansion (merged patches, tiles, row and tile markers, anyres counts) is
transformers' own code, not a copy; only videos are refused.

With torchvision (the normal set-up on a GPU machine: ``pip install torchvision`` matching
the CUDA torch), ``AutoProcessor.from_pretrained`` is used as it is.
"""

from __future__ import annotations

import functools
import inspect

import transformers
from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer
from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
from transformers.utils import is_torchvision_available

_SUB_PROCESSORS = ("image_processor", "tokenizer", "video_processor")


def load_processor(name: str, config=None):
    """The processor of model ``name`` (a local directory or a hub id).

    Parameters
    ----------
    name : str
        What ``from_pretrained`` takes: a directory with the tokenizer, the image processor's
        ``preprocessor_config.json`` and, where the family has one, ``processor_config.json``
        and a chat template; or a hub id.
    config : PretrainedConfig, optional
        The model's config (read from ``name`` if not given): its ``model_type`` picks the
        processor class when the directory does not name one.

    Returns
    -------
    A transformers processor (or, for a text-only model, its tokenizer). Without torchvision,
    a processor whose class also needs a video processor is built without one
    (:func:`without_video`): images work as they do with torchvision, videos do not.

    Raises
    ------
    ValueError
        Without torchvision, where the family's image processor exists only for torchvision
        (LFM2-VL, Llama 4 in transformers 5.24) or its processor class imports torchvision
        (``PixtralProcessor``, Mistral 3); or where the processor needs a package that is
        missing (SmolVLM's needs ``num2words``).
    """
    name = str(name)
    config = config or AutoConfig.from_pretrained(name, trust_remote_code=False)
    if not hasattr(config, "vision_config"):  # a text-only model: its tokenizer is the processor
        try:
            return AutoProcessor.from_pretrained(name, trust_remote_code=False)
        except Exception:
            return AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    if is_torchvision_available():
        return AutoProcessor.from_pretrained(name, trust_remote_code=False)
    cls = _processor_class(name, config)
    if getattr(cls, "is_dummy", False):  # transformers' stand-in for a class it could not import
        raise ValueError(
            f"transformers' {cls.__name__} (for {config.model_type!r} models) imports torchvision itself, which "
            f"cannot be used with a CPU build of torch; load {name!r} on a machine with the CUDA build of torch "
            "and the matching torchvision (`pip install torchvision`)"
        )
    _check_pil_image_processor(config.model_type, name)
    if cls is None or "video_processor" not in cls.get_attributes():
        # LLaVA, LLaVA-NeXT, Gemma 3: no video processor; the auto classes pick the PIL
        # image processor by themselves
        return _explain(AutoProcessor.from_pretrained, name, trust_remote_code=False)
    processor_dict, _ = cls.get_processor_dict(name, trust_remote_code=False)
    # the processor's own options (image_seq_len, num_image_tokens, vision_aspect_ratio, the
    # chat template ...), as from_pretrained would pass them
    parameters = inspect.signature(cls.__init__).parameters
    options = {k: v for k, v in processor_dict.items() if k in parameters and k not in _SUB_PROCESSORS}
    image_processor = _explain(AutoImageProcessor.from_pretrained, name, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    return _explain(without_video(cls), image_processor, tokenizer, **options)


@functools.cache
def without_video(cls: type) -> type:
    """``cls`` (a transformers processor class) built without a video processor.

    A subclass, so ``isinstance(p, cls)`` holds and every method is ``cls``'s own: its
    ``__init__`` passes ``video_processor=None`` and declares only the image processor and
    the tokenizer as sub-processors (``ProcessorMixin`` checks the class of each one it
    declares, and a video processor class cannot even be imported without torchvision).
    Its ``video_processor`` is a :class:`NoVideoProcessor`: processing a video raises a clear
    error; images and text work as with ``cls``.
    """

    def __init__(self, image_processor=None, tokenizer=None, **options):
        cls.__init__(self, image_processor=image_processor, tokenizer=tokenizer, video_processor=None, **options)
        self.video_processor = NoVideoProcessor()

    doc = f"{cls.__name__} without its video processor (built by elastic.processors.without_video)."
    # the same name, so a saved processor_config.json names the real class
    return type(cls.__name__, (cls,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


class NoVideoProcessor:
    """Stands in for the video processor of a :func:`without_video` processor: a video raises
    a clear error; the frame-sampling defaults that SmolVLM's chat template reads are unset."""

    num_frames = None
    fps = None
    model_input_names = ()

    def __call__(self, *args, **kwargs):
        raise ValueError(
            "videos need transformers' video processor, which needs torchvision (not usable with a CPU "
            "build of torch); on a machine with the CUDA torch, `pip install torchvision` and load again"
        )


def _processor_class(name: str, config) -> type | None:
    """The class named in the directory's processor config, else the family's (model_type)."""
    try:
        processor_dict, _ = transformers.ProcessorMixin.get_processor_dict(name, trust_remote_code=False)
    except Exception:  # no processor config: the family decides
        processor_dict = {}
    class_name = processor_dict.get("processor_class") or PROCESSOR_MAPPING_NAMES.get(config.model_type)
    return getattr(transformers, class_name, None) if class_name else None


def _check_pil_image_processor(model_type: str, name: str) -> None:
    backends = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type)
    if backends and not backends.get("pil"):
        raise ValueError(
            f"the image processor of {model_type!r} models ({backends.get('torchvision')}) exists only for "
            f"torchvision, which cannot be used with a CPU build of torch; load {name!r} on a machine with "
            "the CUDA build of torch and the matching torchvision (`pip install torchvision`)"
        )


def _explain(build, *args, **kwargs):
    """Call ``build``; a missing package becomes a ValueError that says what to install."""
    try:
        return build(*args, **kwargs)
    except ImportError as error:
        raise ValueError(f"the processor needs a package that is not installed: {error}") from error
