"""The app end to end on a tiny model of each image layout: ``./run.sh app --model DIR``.

For one family per layout -- one run of merged patches (Qwen2.5-VL), tiles behind row
markers plus the global image (SmolVLM), tiles back to back (InternVL), anyres with a newline
column (LLaVA-OneVision) -- a tiny random checkpoint (model, tokenizer, PIL image processor,
chat template) is written to a folder, the app is started on it as a user starts it, and
/chat and /panel are driven through ``gradio_client`` (public CLI and API only). The reference
for the Image view is the family's own processor: the overlay holds one cell per image token
it wrote (anyres: minus the newline column).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
import transformers
from gradio_client import Client, handle_file
from PIL import Image
from transformers import AutoModelForImageTextToText

from test_processors import (PINPOINTS, QWEN, QWEN_IMAGE, family_vocab, merged_patch_config, process,
                             save_checkpoint, tiny_text, tiny_vision)

ROOT = Path(__file__).resolve().parent.parent
IMAGE_SIZE = (32, 16)  # width x height


def qwen2_5_vl(path):
    vocab = family_vocab(QWEN)
    config = merged_patch_config("qwen2_5_vl", vocab)
    save_checkpoint(path, vocab, config, transformers.Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=8 * 8, max_pixels=64 * 64), QWEN, QWEN_IMAGE)
    return config, vocab["<|image_pad|>"], 0


def smolvlm(path):
    tokens = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
              "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"}
    vocab = family_vocab(tokens, ["<row_1_col_1>", "<row_1_col_2>"])
    config = transformers.SmolVLMConfig(text_config=dict(model_type="llama", **tiny_text()), scale_factor=2,
                                        vision_config=tiny_vision(image_size=16, patch_size=4),
                                        image_token_id=vocab["<image>"])
    save_checkpoint(path, vocab, config, transformers.SmolVLMImageProcessorPil(
        do_image_splitting=True, size={"longest_edge": 32}, max_image_size={"longest_edge": 16}), tokens, "<image>",
        options={"processor_class": "SmolVLMProcessor", "image_seq_len": 4})
    return config, vocab["<image>"], 0


def internvl(path):
    tokens = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
              "video_token": "<video>"}
    vocab = family_vocab(tokens)
    config = transformers.InternVLConfig(
        text_config=dict(model_type="qwen2", **tiny_text()), downsample_ratio=0.5, image_seq_length=4,
        vision_config=tiny_vision(image_size=[16, 16], patch_size=[4, 4]), image_token_id=vocab["<IMG_CONTEXT>"])
    save_checkpoint(path, vocab, config, transformers.GotOcr2ImageProcessorPil(
        size={"height": 16, "width": 16}, crop_to_patches=True, min_patches=1, max_patches=4), tokens, "<IMG_CONTEXT>",
        options={"processor_class": "InternVLProcessor", "image_seq_length": 4})
    return config, vocab["<IMG_CONTEXT>"], 0


def llava_onevision(path):
    tokens = {"image_token": "<image>", "video_token": "<video>"}
    vocab = family_vocab(tokens)
    config = transformers.LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", **tiny_vision(image_size=16, patch_size=4)),
        text_config=dict(model_type="qwen2", **tiny_text()), vision_feature_select_strategy="full",
        image_grid_pinpoints=PINPOINTS, image_token_index=vocab["<image>"], vision_feature_layer=-1,
        video_token_index=vocab["<video>"])
    save_checkpoint(path, vocab, config, transformers.LlavaOnevisionImageProcessorPil(
        size={"height": 16, "width": 16}, image_grid_pinpoints=PINPOINTS), tokens, "<image>",
        options={"processor_class": "LlavaOnevisionProcessor", "num_image_tokens": 16,
                 "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9"})
    # 32 x 16 picks the 16 x 32 pinpoint: the 4 x 8 grid ends each of its 4 rows with a newline token
    return config, vocab["<image>"], 4


LAYOUTS = {"qwen2_5_vl": qwen2_5_vl, "smolvlm": smolvlm, "internvl": internvl, "llava_onevision": llava_onevision}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect(url, app, seconds=240):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if app.poll() is not None:
            raise AssertionError(f"the app exited with {app.returncode}: {app.stdout.read()[-2000:]}")
        try:
            return Client(url, verbose=False)
        except Exception:  # not up yet
            time.sleep(1)
    raise AssertionError(f"the app did not come up in {seconds} s")


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_app_runs_a_tiny_model_of_each_image_layout(tmp_path, family):
    folder = tmp_path / family
    folder.mkdir()
    config, image_token, newlines = LAYOUTS[family](folder)
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(folder)
    picture = tmp_path / "picture.png"
    Image.new("RGB", IMAGE_SIZE, "red").save(picture)
    _, inputs = process(folder, Image.open(picture))
    cells = int((inputs["input_ids"] == image_token).sum()) - newlines  # the processor's image tokens

    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    app = subprocess.Popen([str(ROOT / "run.sh"), "app", "--model", str(folder), "--device", "cpu", "--port",
                            str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = connect(f"http://127.0.0.1:{port}/", app)
        message = {"text": "what is in the image ?", "files": [handle_file(str(picture))]}
        job = client.submit(message, [], "elastic", 0.5, 1, -8, 4, 0, api_name="/chat")
        job.result()
        history = job.outputs()[-1][0]
        assert history[-1]["role"] == "assistant" and "error" not in json.dumps(history[-1]).lower()
        panel = client.predict(0, api_name="/panel")
        overlay = json.loads(panel[2]["plot"])
        patches = [t for t in overlay["data"] if t.get("name") == "patches"]
        assert len(patches) == 1
        drawn = [c for row in patches[0]["customdata"] for c in row if c is not None]
        assert len(drawn) == cells  # every image token of every tile drawn once (anyres: newlines are not cells)
        assert overlay["layout"]["images"]  # the picture under the cells
    finally:
        app.terminate()
        try:
            app.wait(timeout=30)
        except subprocess.TimeoutExpired:
            app.kill()
