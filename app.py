"""Elastic Cache Explorer: chat with a vision-language model and watch its KV cache.

    python app.py                                  # the shipped SmolLM2 with eyes, CPU, offline
    python app.py --model llava-hf/llava-1.5-7b-hf --share

The Hugging Face Space's entry: the page is built by :mod:`explorer` (answers from
:func:`elastic.generate`, figures from :mod:`viz`); this file loads the model and serves it.
"""

from __future__ import annotations

# ZeroGPU wants `spaces` imported before torch; elsewhere gpu() leaves a handler as it is.
try:
    import spaces

    def gpu(fn):
        return spaces.GPU(duration=120)(fn)
except ImportError:  # not on a Hugging Face Space
    def gpu(fn):
        return fn

import argparse
import os
import sys

import gradio as gr

import elastic
from elastic.quantize import QUANTIZE_CHOICES
from explorer import layout
# The names scripts and tests use as app.X (the package holds them; see explorer/__init__.py).
from explorer.chat import chat, clear_chat, waiting_status  # noqa: F401
from explorer.compare import compare, compare_from_chat, compare_methods  # noqa: F401
from explorer.defaults import (COMPARE_METHODS, DEFAULT_BUDGET, DEFAULT_MAX_NEW_TOKENS,  # noqa: F401
                               DEFAULT_METHOD, EXAMPLES_DIR, load_examples)
from explorer.history import conversation  # noqa: F401
from explorer.limits import CONCURRENCY, MAX_QUESTION_CHARS, MAX_SESSIONS  # noqa: F401
from explorer.panel import render_panel, show_panel  # noqa: F401
from explorer.runner import DURATIONS, GENERATING  # noqa: F401
from explorer.sessions import MODEL, SESSIONS, ModelSlot, Session, forget_session, session_of  # noqa: F401


def build(examples_dir=EXAMPLES_DIR) -> gr.Blocks:
    """The whole app (``examples_dir`` holds ``examples.json`` and its images)."""
    return layout.build(examples_dir, gpu=gpu)


demo = build()


def serve(blocks: gr.Blocks | None = None, **launch):
    """Queue and launch ``blocks`` (default: ``demo``) within the server's bounds (``explorer.limits``)."""
    return layout.serve(blocks or demo, **launch)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=os.environ.get("ELASTIC_MODEL"),
                        help="hub id, local path, scene-smollm2 (default) or tiny-llava, e.g. "
                             "llava-hf/llava-1.5-7b-hf, llava-hf/llava-1.5-13b-hf, Qwen/Qwen2-VL-2B-Instruct")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--quantize", default=os.environ.get("ELASTIC_QUANTIZE") or None, choices=QUANTIZE_CHOICES,
                        help="int8: weight-only int8 language model, faster decoding on a CPU (not the default)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    try:
        MODEL.load(args.model, args.device, args.quantize)
    except (elastic.ModelLoadError, ValueError) as error:  # ValueError: a setting that cannot work
        hint = "" if args.model or isinstance(error, ValueError) else " (./run.sh sets it up; or pass --model)"
        sys.exit(f"error: {error}{hint}")
    serve(server_name=args.host, server_port=args.port, share=args.share)
