"""Elastic Cache: training-free KV-cache compression for vision-language models.

    import elastic
    elastic.attach(model)
    cache = elastic.make_cache("elastic", budget=0.5)
    out = model.generate(**inputs, cache=cache, max_new_tokens=64, do_sample=False)
    cache.trace, cache.kv_bytes()
"""

from .budget import check_budget, keep_count
from .cache import LAYOUTS, PolicyCache, PolicyLayer, PreallocatedLayer, make_cache
from .policies import METHODS, POLICIES, ElasticPolicy, H2OPolicy, LocalPolicy, Policy, make_policy
from .scoring import attach, attention_received, is_attached
from .generation import Generation, build_inputs, generate, load_image, user_message
from .spans import ImageTile, image_tiles, prompt_annotations, prompt_spans
from .metrics import perplexity, rouge_l
from .models import SHIPPED_MODEL, ModelLoadError, load_model
from .trace import LayerTrace, Trace

__version__ = "0.2.0"

__all__ = [
    "METHODS", "POLICIES", "Policy", "ElasticPolicy", "H2OPolicy", "LocalPolicy", "make_policy",
    "PolicyCache", "PolicyLayer", "PreallocatedLayer", "LAYOUTS", "make_cache", "attach", "is_attached", "attention_received",
    "Trace", "LayerTrace", "check_budget", "keep_count", "generate", "Generation", "build_inputs",
    "load_image", "user_message", "load_model", "ModelLoadError", "SHIPPED_MODEL", "rouge_l", "perplexity",
    "prompt_spans", "prompt_annotations", "image_tiles", "ImageTile",
]
