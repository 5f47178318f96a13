"""GPU check: LLaVA-1.5-7B at full size with random weights, full / elastic / H2O, in one command.

    python bench/gpu_check.py                            # CUDA, bfloat16, 900 + 512 tokens, batch 1 and 8
    python bench/gpu_check.py --device cpu --tiny        # the same code on a tiny random LLaVA: seconds (CI)

No hub: the model is built from the published configuration in
``assets/configs/llava-1.5-7b`` (32 layers, 4096 wide, 7.06B parameters, 13.2 GiB in
bfloat16) and initialised at random (speed and memory do not depend on the weights). The
prompt is the paper's 900-token setting with the processor's structure: 5 system tokens,
576 image tokens (a random 336 x 336 image), then text (:func:`elastic.memory.prompt_spans`),
and 512 generated tokens.

Every configuration is timed by :func:`elastic.benchmark.measure` (the code behind
``python -m elastic.benchmark``): a warm-up run first (2 new tokens), CUDA synchronised
at every forward, the prefill and the decode phase apart; peak memory is
``torch.cuda.max_memory_allocated`` minus what was allocated before the run (the weights
are not in it). Configurations are measured in rounds (interleaved; the fastest of each
is kept), up to ``--repeats`` rounds.

Time: 12 generations of 512 tokens a round (full twice, DynamicCache and preallocated;
elastic and h2o at 0.2 and 0.5; batch 1 and 8). ``generate`` on a 32-layer model is bound
by Python overhead per step, about 25-40 ms (the policies' hooks included) on a recent
GPU, so one round takes about 2.5-4 minutes and the model build under 30 s. No run starts
once ``--time-limit`` seconds (default 270, counted from the start, the build included)
would be exceeded by the estimate of its length (its own last run, else the last run
measured): skipped configurations are listed, so the whole check stays under 5 minutes.

Each row's KV bytes are checked against the memory calculator (:func:`elastic.memory.rows`
for the same shape, prompt and batch): the script exits 1 if any differs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from elastic import METHODS, benchmark, memory  # noqa: E402
from elastic.scoring import attach  # noqa: E402

MODEL = "llava-1.5-7b"
# --tiny: the same configuration with a tiny language model and vision tower (16 image tokens).
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, head_dim=16)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56)


def build_model(tiny: bool = False, device: str = "cuda", dtype=torch.bfloat16, seed: int = 0):
    """A randomly initialised ``LlavaForConditionalGeneration`` from the published
    configuration (``tiny``: with :data:`TINY_TEXT` / :data:`TINY_VISION` overrides),
    attached, in eval mode."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(memory.config_dir(MODEL))
    if tiny:
        for key, value in TINY_TEXT.items():
            setattr(config.text_config, key, value)
        for key, value in TINY_VISION.items():
            setattr(config.vision_config, key, value)
        config.image_seq_length = image_tokens(config)
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs: no 14 GB copy from the CPU
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return attach(model.eval())


def image_tokens(config) -> int:
    """Image tokens in the prompt: ``(image_size / patch)^2`` (the CLS feature is dropped)."""
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def input_maker(model, prompt_tokens: int, seed: int = 0):
    """``(make_inputs, spans)``: ``make_inputs(batch)`` gives a ``prompt_tokens``-token
    prompt laid out as the LLaVA processor lays it out (:func:`elastic.memory.prompt_spans`:
    system, image, text; random token ids around the image tokens) and a random image, the
    same for every sample."""
    config = model.config
    spans = memory.prompt_spans(memory.shape_of(model), prompt_tokens, image=image_tokens(config))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, config.image_token_id, (1, prompt_tokens), generator=g)  # never the image token
    ids[0, 0] = 1  # <s>
    ids[0, slice(*spans["image"])] = config.image_token_id
    size = config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=g)

    def make(batch):
        return {"input_ids": ids.repeat(batch, 1).to(model.device),
                "attention_mask": torch.ones(batch, prompt_tokens, dtype=torch.long, device=model.device),
                "pixel_values": pixels.repeat(batch, 1, 1, 1).to(model.device, model.dtype)}

    return make, spans


def run(model, make_inputs, batches, pairs, new_tokens: int, repeats: int, deadline: float,
        progress=print) -> tuple[list[benchmark.Measurement], list[tuple], int]:
    """``(fastest measurement per configuration, configurations never measured, rounds)``.

    Every ``(batch, method, budget, layout)`` is warmed up once, then measured in up to
    ``repeats`` interleaved rounds (on a shared machine noise only adds time, and
    interleaving spreads it over all configurations). A run is skipped when its estimated
    length would end past ``deadline`` (a ``time.perf_counter`` value).
    """
    inputs = {batch: make_inputs(batch) for batch in batches}
    keys = [(batch, *pair) for batch in batches for pair in pairs]
    for batch, method, budget, layout in keys:  # first-call costs (kernels, allocator) off the clock
        benchmark.measure(model, inputs[batch], method, budget, 2, memory=False, layout=layout)
    best: dict[tuple, benchmark.Measurement] = {}
    last = None  # latency of the latest run: the estimate for a configuration not yet measured
    rounds = 0
    for r in range(repeats):
        ran = False
        for key in keys:
            estimate = best[key].latency_s if key in best else (last or 0.0)
            if time.perf_counter() + estimate > deadline:
                continue
            batch, method, budget, layout = key
            m = benchmark.measure(model, inputs[batch], method, budget, new_tokens, layout=layout)
            last, ran = m.latency_s, True
            if key not in best or m.latency_s < best[key].latency_s:
                best[key] = m
            if progress:
                progress(f"  batch {batch} {m.label:>20} {budget:<4g} round {r + 1}/{repeats}: {m.latency_s:7.2f} s, "
                         f"prefill {m.prefill_s:6.3f} s, {m.decode_tps:8.1f} tok/s decode")
        rounds += ran
        if not ran:
            break
    return [best[k] for k in keys if k in best], [k for k in keys if k not in best], rounds


def calculator_check(results, shape: memory.ModelShape, dtype, spans) -> list[tuple[bool, str]]:
    """``(matches, text)`` per measurement: the KV bytes the cache held at the end against
    :func:`elastic.memory.rows` for the same shape, prompt, batch and budget
    (transformers' DynamicCache holds what the full cache holds)."""
    checks = []
    for m in results:
        system, image = (spans[name][1] - spans[name][0] for name in ("system", "image"))
        row, = memory.rows(shape, [m.prompt_tokens], [m.batch], [m.method], [m.budget], m.new_tokens,
                           str(dtype).removeprefix("torch."), system=system, image=image)
        checks.append((m.kv_bytes == row.kv_bytes,
                       f"batch {m.batch} {m.label} {m.budget:g}: KV {m.kv_bytes} bytes held, calculator "
                       f"{row.kv_bytes} ({row.count(row.end_entries)} entries per layer)"))
    return checks


def main(argv=None) -> int:
    began = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny random LLaVA (smoke test; defaults 64 + 16 tokens)")
    ap.add_argument("--dtype", default=None, help="default bfloat16 (float32 with --tiny)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--methods", default="elastic,h2o", help="compared with the full cache (both layouts)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 900; 64 with --tiny)")
    ap.add_argument("--new", type=int, default=None, help="generated tokens (default 512; 16 with --tiny)")
    ap.add_argument("--repeats", type=int, default=None, help="rounds at most, the fastest run kept (default 3; 1 with --tiny)")
    ap.add_argument("--time-limit", type=float, default=270.0,
                    help="seconds from the start (build included) past which no run is started")
    ap.add_argument("--json", default=None, help="also write the measurements and the calculator's bytes here")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype or ("float32" if args.tiny else "bfloat16"))
    prompt = args.prompt or (64 if args.tiny else 900)
    new = args.new or (16 if args.tiny else 512)
    repeats = args.repeats or (1 if args.tiny else 3)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --tiny for the smoke test")

    model = build_model(args.tiny, args.device, dtype)
    shape = memory.shape_of(model, "tiny-llava-1.5" if args.tiny else MODEL)
    make_inputs, spans = input_maker(model, prompt)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"{shape.name}: {shape.layers} layers, {shape.kv_heads} KV heads x {shape.head_dim}, "
          f"{shape.parameters / 1e9:.3f}B parameters ({weights / 2**30:.2f} GiB {dtype}, random), "
          f"built in {time.perf_counter() - began:.1f} s on {benchmark.machine()}")
    print(f"prompt {prompt} tokens = {' + '.join(f'{b - a} {name}' for name, (a, b) in spans.items())}, "
          f"{new} new tokens, batch {' and '.join(map(str, args.batch))}")
    pairs = benchmark.configs(methods, args.budgets)
    results, skipped, rounds = run(model, make_inputs, args.batch, pairs, new, repeats,
                                   began + args.time_limit)
    print()
    print(benchmark.format_table(results))
    print()
    for batch, method, budget, layout in skipped:
        print(f"skipped (time limit): batch {batch} {method} {budget:g} {layout}")
    peak = (f"; torch.cuda.max_memory_allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB overall, "
            "weights included") if args.device.startswith("cuda") else ""
    kind = results[0].memory_kind if results else "-"
    print(f"{rounds} round(s), fastest kept; peak mem = {kind} above the weights ({weights / 2**30:.2f} GiB){peak}; "
          f"total {time.perf_counter() - began:.0f} s")
    checks = calculator_check(results, shape, dtype, spans)
    for ok, text in checks:
        if not ok:
            print("MISMATCH " + text)
    agree = all(ok for ok, _ in checks)
    print("KV bytes of every row match elastic.memory" if agree else "KV bytes differ from elastic.memory")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": benchmark.machine(), "model": shape.name, "parameters": shape.parameters, "spans": spans,
            "results": [asdict(m) for m in results], "skipped": skipped, "rounds": rounds,
        }, indent=1))
    if not results:
        print("nothing was measured within the time limit")
    return 0 if agree and results else 1


if __name__ == "__main__":
    sys.exit(main())
