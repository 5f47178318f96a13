"""Speed and memory of each KV-cache method next to the full cache, in one run.

    python -m elastic.benchmark                                   # random ~110M Llama, 1024 + 512, batch 1 and 8
    python -m elastic.benchmark --model shipped --image --batch 1 8 --new 128
    python -m elastic.benchmark --model random-tiny --prompt 64 --new 16   # seconds, for development

The full cache is measured both ways: transformers' ``DynamicCache`` as users run it
(it copies itself with ``torch.cat`` every step) and preallocated (``make_cache("full")``);
every ratio is against the faster of the two, so no speed-up comes from a slow baseline.

Every configuration is timed by the same code (:func:`measure`, also used by
``bench/bench_overhead.py``): ``model.generate`` with greedy decoding forced to exactly
``new`` tokens (``min_new_tokens``), a forward hook marking the end of every forward
(CUDA is synchronised first), so the prefill (the first forward, compression included)
and the decode phase are timed apart. Throughput is the paper's: generated tokens of the
whole batch divided by the total latency.

Peak memory: on CUDA, ``max_memory_allocated`` minus what was allocated before the run;
on CPU, torch's allocations are invisible to ``tracemalloc``, so a thread samples the
process's resident memory (``/proc/self/statm``) every 2 ms after ``malloc_trim`` has
returned freed memory to the OS, and reports the rise over the pre-run level. Either way
it covers the cache, the activations and the temporaries (scores) of the run, not the
weights. ``kv_bytes`` is what the cache holds at the end, exactly.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import threading
import time
from dataclasses import asdict, dataclass

import torch
from transformers import DynamicCache

from .cache import LAYOUTS, make_cache
from .policies import METHODS

TRANSFORMERS = "DynamicCache"  # the layout name of transformers' own cache in a measurement

RANDOM_MODELS = {
    # ~110M parameters: 12 layers of 768 (Llama-style MLP 2048), 32k vocabulary, tied embeddings.
    "random-100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                        num_key_value_heads=12, vocab_size=32000, tie_word_embeddings=True),
    "random-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=256),
}


def random_llama(name: str = "random-100m", seed: int = 0, dtype=torch.float32, device: str = "cpu"):
    """A randomly initialised ``LlamaForCausalLM`` (speed does not depend on the weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**RANDOM_MODELS[name], max_position_embeddings=8192, attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


# ---------------------------------------------------------------- measuring

class PeakMemory:
    """Peak memory rise during a ``with`` block (see the module docstring for what it counts)."""

    def __init__(self, device, interval: float = 0.002):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes = 0
        self.kind = "cuda max allocated" if self.device.type == "cuda" else "cpu rss"

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        _malloc_trim()
        self.base = self.peak = _rss()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(self.interval):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.stop.set()
            self.thread.join()
            self.peak_bytes = max(self.peak, _rss()) - self.base
        return False


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: fall back to the lifetime peak (coarser)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _ForwardClock:
    """``perf_counter`` at the end of every forward of ``model``."""

    def __init__(self, model):
        self.marks: list[float] = []
        self.cuda = model.device.type == "cuda"
        self.handle = model.register_forward_hook(self._mark)

    def _mark(self, *_):
        if self.cuda:
            torch.cuda.synchronize()
        self.marks.append(time.perf_counter())

    def close(self):
        self.handle.remove()


@dataclass
class Measurement:
    """One timed generation; byte counts cover the whole batch."""

    method: str
    budget: float
    batch: int
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    latency_s: float
    throughput: float  # batch * new_tokens / latency_s (the paper's tokens/s)
    decode_tps: float  # batch * (new_tokens - 1) / decode_s
    peak_mem_bytes: int
    kv_bytes: int
    kv_full_bytes: int  # what a full cache would hold for the same tokens
    memory_kind: str = "cpu rss"
    layout: str = "preallocated"  # or "dynamic", or "DynamicCache" (transformers' cache, full only)

    @property
    def label(self) -> str:
        return self.method if self.layout == "preallocated" else f"{self.method} ({self.layout})"

    @property
    def kv_ratio(self) -> float:
        return self.kv_bytes / self.kv_full_bytes


@torch.inference_mode()
def measure(model, inputs: dict, method: str, budget: float, new_tokens: int, memory: bool = True,
            layout: str = "preallocated", **cache_params) -> Measurement:
    """Time one greedy ``generate`` of exactly ``new_tokens`` tokens with a fresh cache.

    ``layout`` is a :func:`~elastic.make_cache` layout, or ``"DynamicCache"`` for
    transformers' own cache (``method`` must then be ``"full"``).
    """
    if new_tokens < 2:
        raise ValueError("new_tokens must be >= 2 (one prefill token plus at least one decode step)")
    if layout == TRANSFORMERS:
        if method != "full":
            raise ValueError("transformers' DynamicCache is a full cache: use it with method='full'")
        cache = DynamicCache()
    elif layout in LAYOUTS:
        # Room for every token from the start: no buffer regrows while the clock runs.
        cache = make_cache(method, budget=budget, layout=layout, reserve=new_tokens, **cache_params)
    else:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join((*LAYOUTS, TRANSFORMERS))}")
    batch, T = inputs["input_ids"].shape
    gen = model.generation_config
    pad = gen.pad_token_id if gen.pad_token_id is not None else 0
    clock = _ForwardClock(model)
    meter = PeakMemory(model.device) if memory else None
    try:
        if meter:
            meter.__enter__()
        if clock.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(**inputs, cache=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=pad)
        if clock.cuda:
            torch.cuda.synchronize()
        end = time.perf_counter()
    finally:
        if meter:
            meter.__exit__(None, None, None)
        clock.close()
    produced = out.shape[1] - T
    if produced != new_tokens:
        raise RuntimeError(f"generate produced {produced} tokens instead of {new_tokens}")
    marks = clock.marks
    kv = sum(x.numel() * x.element_size() for layer in cache.layers for x in (layer.keys, layer.values))
    per_entry = kv // (cache.layers[0].keys.shape[-2] * batch)
    return Measurement(
        method=method, budget=budget, batch=batch, prompt_tokens=T, new_tokens=new_tokens,
        prefill_s=marks[0] - start, decode_s=marks[-1] - marks[0], latency_s=end - start,
        throughput=batch * new_tokens / (end - start),
        decode_tps=batch * (len(marks) - 1) / (marks[-1] - marks[0]),
        peak_mem_bytes=meter.peak_bytes if meter else 0, kv_bytes=kv,
        kv_full_bytes=per_entry * (T + new_tokens - 1) * batch, memory_kind=meter.kind if meter else "not measured",
        layout=layout,
    )


def configs(methods, budgets) -> list[tuple[str, float, str]]:
    """``(method, budget, layout)``: the full cache both ways (transformers' DynamicCache,
    then preallocated), then every method x budget (preallocated)."""
    pairs = [("full", 1.0, TRANSFORMERS), ("full", 1.0, "preallocated")]
    pairs += [(m, float(b), "preallocated") for m in methods if m != "full" for b in budgets]
    return pairs


def full_baseline(results: list[Measurement]) -> dict[int, Measurement]:
    """Per batch size, the faster (lower latency) full-cache measurement: what ratios use."""
    best = {}
    for m in results:
        if m.method == "full" and (m.batch not in best or m.latency_s < best[m.batch].latency_s):
            best[m.batch] = m
    return best


def run_suite(model, make_inputs, batches, pairs, new_tokens: int, repeats: int = 1, memory: bool = True,
              progress=print, **cache_params) -> list[Measurement]:
    """Measure every ``(method, budget, layout)`` of :func:`configs` at every batch size,
    side by side.

    ``make_inputs(batch)`` returns the model inputs. Each configuration is warmed up once on
    a short run; with ``repeats > 1`` the configurations are interleaved and the fastest
    run is kept (on a shared machine noise only ever adds time; interleaving spreads slow
    spells over all configurations).
    """
    results = []
    for batch in batches:
        inputs = make_inputs(batch)
        for method, budget, layout in pairs:  # warm-up: first-call costs (kernels, allocator) off the clock
            measure(model, inputs, method, budget, 2, memory=False, layout=layout, **cache_params)
        runs = {pair: [] for pair in pairs}
        for r in range(repeats):
            for method, budget, layout in pairs:
                m = measure(model, inputs, method, budget, new_tokens, memory=memory, layout=layout, **cache_params)
                runs[(method, budget, layout)].append(m)
                if progress:
                    progress(f"  batch {batch} {m.label:>20} {budget:<4g} run {r + 1}/{repeats}: "
                             f"{m.latency_s:7.2f} s, prefill {m.prefill_s:6.2f} s, {m.decode_tps:7.1f} tok/s decode")
        results += [min(runs[pair], key=lambda m: m.latency_s) for pair in pairs]
    return results


# ---------------------------------------------------------------- reporting

def _mb(n: int) -> str:
    return f"{n / 2**20:.1f}"


def format_table(results: list[Measurement]) -> str:
    """The paper's latency-table layout, plus prefill / decode split, with ratios to the
    faster full cache (:func:`full_baseline`)."""
    full = full_baseline(results)
    head = ("| batch | prompt + new | method | budget | latency (s) | throughput (tok/s) | speed-up | "
            "prefill (s) | prefill / full | decode (tok/s) | decode / full | peak mem (MB) | KV (MB) | KV / full |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for m in results:
        f = full.get(m.batch, m)
        lines.append(
            f"| {m.batch} | {m.prompt_tokens} + {m.new_tokens} | {m.label} | {m.budget:g} | {m.latency_s:.2f} | "
            f"{m.throughput:.1f} | {m.throughput / f.throughput:.2f}x | {m.prefill_s:.3f} | "
            f"{m.prefill_s / f.prefill_s:.2f}x | {m.decode_tps:.1f} | {m.decode_tps / f.decode_tps:.2f}x | "
            f"{_mb(m.peak_mem_bytes)} | {_mb(m.kv_bytes)} | {m.kv_ratio:.3f} |"
        )
    return "\n".join(lines)


def machine() -> str:
    """One line describing where the numbers were taken."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads{gpu}")


# ---------------------------------------------------------------- inputs and CLI

def load(model_name: str, device: str, dtype):
    """``(model, processor or None)`` for a ``random-*`` preset, ``shipped`` or a path / hub id."""
    if model_name in RANDOM_MODELS:
        from .scoring import attach

        return attach(random_llama(model_name, dtype=dtype, device=device)), None
    from .models import load_model

    return load_model(None if model_name in ("shipped", "default") else model_name, device=device, dtype=dtype)


def input_maker(model, processor, prompt_tokens: int, image: bool, seed: int = 0):
    """``make_inputs(batch)``: random token ids of ``prompt_tokens``, or (``image``) the
    image + description prompt of a synthetic validation scene, repeated over the batch."""
    if image:
        if processor is None or not hasattr(processor, "image_processor"):
            raise ValueError("--image needs a vision-language model (e.g. --model shipped)")
        from .generation import build_inputs
        from .tiny.data import DESCRIBE_PROMPT, VAL_OFFSET, make_scene, render

        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DESCRIBE_PROMPT}]}]
        one, _ = build_inputs(model, processor, messages, render(make_scene(VAL_OFFSET)))

        def make(batch):
            # LLaVA's pixel_values are [1, C, H, W]; Qwen2-VL's are [patches, dim] with one
            # grid row per image: repeating along dim 0 is right for both.
            return {k: v.repeat(batch, *[1] * (v.dim() - 1)) for k, v in one.items() if isinstance(v, torch.Tensor)}

        return make
    vocab = model.config.get_text_config().vocab_size

    def make(batch):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(4, vocab, (batch, prompt_tokens), generator=g).to(model.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    return make


def add_common_args(ap: argparse.ArgumentParser, batch, prompt, new, budgets):
    ap.add_argument("--model", default="random-100m",
                    help="random-100m, random-tiny, shipped (the default model, scene-smollm2), tiny-llava, or a local path / hub id")
    ap.add_argument("--batch", type=int, nargs="+", default=batch)
    ap.add_argument("--prompt", type=int, default=prompt, help="random prompt length in tokens")
    ap.add_argument("--image", action="store_true", help="use a real image + description prompt (VLMs)")
    ap.add_argument("--new", type=int, default=new, help="generated tokens (forced, no early stop)")
    ap.add_argument("--methods", default="elastic,h2o,local", help="compared with the full cache")
    ap.add_argument("--budgets", type=float, nargs="+", default=budgets)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--no-memory", action="store_true", help="skip the CPU memory sampler")
    ap.add_argument("--json", default=None, help="also write the measurements to this JSON file")


def run_from_args(args) -> list[Measurement]:
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda")
                                                           else torch.float32)
    model, processor = load(args.model, args.device, dtype)
    make_inputs = input_maker(model, processor, args.prompt, args.image)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    params = sum(p.numel() for p in model.parameters())
    print(f"model {args.model} ({params / 1e6:.1f}M parameters, {dtype}) on {machine()}")
    results = run_suite(model, make_inputs, args.batch, configs(methods, args.budgets), args.new,
                        repeats=args.repeats, memory=not args.no_memory)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "model": args.model, "parameters": params,
                       "results": [asdict(m) for m in results]}, f, indent=1)
    return results


def main(argv=None) -> list[Measurement]:
    ap = argparse.ArgumentParser(prog="python -m elastic.benchmark", description=__doc__.split("\n\n")[0])
    add_common_args(ap, batch=[1, 8], prompt=1024, new=512, budgets=[0.2])
    return run_from_args(ap.parse_args(argv))


if __name__ == "__main__":
    main()
