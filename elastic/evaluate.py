"""Quality of each KV-cache method against the full cache: PPL and ROUGE-L vs budget.

    python -m elastic.evaluate                                   # shipped model, synthetic scenes
    python -m elastic.evaluate --methods elastic,h2o --budgets 0.2 0.5 --samples 20 --out runs/eval
    python -m elastic.evaluate --model llava-hf/llava-1.5-7b-hf --data mm-vet.json --image-dir images/
    python -m elastic.evaluate --ablation paper                  # the paper's ablation table, budget 0.5

The paper's protocol (SPEC 1d):

* PPL: perplexity of the reference answer, teacher-forced one token at a time through the
  compressed cache: the prompt is compressed at the prefill, then every answer token is a
  single-token forward, so the decode rule applies to the answer too. Tokens are pooled
  over the data set: ``exp(sum of NLL / number of answer tokens)``.
* ROUGE-L: F1 of each method's greedy generation against the full-cache greedy generation.

Each sample's result is saved under ``OUT/parts/`` as soon as it is done (each (method,
budget) pair becomes one file when all its samples are), so an interrupted run resumes where
it stopped. ``OUT`` also gets ``results.json``, ``results.csv`` and ``figure.html``
(plotly.js embedded, opens offline; PNG too when plotly can export it: ``kaleido``).

Several processes share the samples, one device each, and write the same files
(:mod:`elastic.distributed`, docs/evaluation.md)::

    accelerate launch --multi_gpu --num_processes 2 -m elastic.evaluate --device cpu --out runs/eval
    accelerate launch --num_processes 8 -m elastic.evaluate --out runs/eval   # 8 GPUs
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from . import datasets, distributed
from .cache import make_cache
from .policies import METHODS
from .metrics import perplexity, rouge_l

DEFAULT_BUDGETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
FIELDS = ("method", "budget", "ppl", "rouge_l", "samples", "tokens", "ppl_mean", "kv_kept", "seconds")


# ---------------------------------------------------------------- inputs

def _eos_ids(model, processor) -> set[int]:
    tokenizer = getattr(processor, "tokenizer", processor)
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def prepare(model, processor, sample: datasets.Sample) -> tuple[dict, torch.Tensor]:
    """Prompt inputs and the reference answer's token ids ``[n]``.

    The answer tokens are what the chat template puts after the generation prompt for this
    answer (so the first one carries the same leading space as in training), up to and
    including the first end-of-sequence token.
    """
    return _prepare(model, processor, sample)[:2]


def _prepare(model, processor, sample: datasets.Sample) -> tuple[dict, torch.Tensor, dict]:
    """:func:`prepare` plus the prompt's annotations (spans: a policy may protect one)."""
    from .generation import build_inputs, tokenize_chat_text

    image = sample.load_image()
    prompt, annotations = build_inputs(model, processor, sample.messages, image)
    text = processor.apply_chat_template(sample.with_answer(), tokenize=False, add_generation_prompt=False)
    full = tokenize_chat_text(model, processor, text, image)["input_ids"][0]
    ids = prompt["input_ids"][0]
    T = len(ids)
    if len(full) > T and torch.equal(full[:T], ids):
        answer = full[T:]
    else:  # a template whose generation prompt is not a prefix of the answered chat
        tokenizer = getattr(processor, "tokenizer", processor)
        answer = torch.tensor(tokenizer(sample.answer, add_special_tokens=False).input_ids, device=ids.device)
        warnings.warn(f"sample {sample.id}: the chat template's generation prompt is not a prefix of the "
                      "answered chat; scoring the answer tokenised on its own", stacklevel=2)
    eos = _eos_ids(model, processor)
    stops = [i for i, t in enumerate(answer.tolist()) if t in eos]
    if stops:
        answer = answer[: stops[0] + 1]
    if len(answer) == 0:
        raise ValueError(f"sample {sample.id}: the reference answer has no tokens")
    return prompt, answer, annotations


# ---------------------------------------------------------------- PPL

def decode_position_ids(model, position: int, batch: int = 1) -> torch.Tensor:
    """Position ids of one decoded token at true sequence position ``position``.

    A compressed cache is shorter than the sequence, so the model's default (cache length)
    would be wrong. Qwen2-VL style mRoPE models use 3-D positions: a text token after the
    image sits at ``position + rope_deltas`` on all three axes, where ``rope_deltas`` (set at
    the prefill by the model) is how much the image's grid positions shortened the prompt.
    """
    device = model.device
    inner = getattr(model, "model", None)
    if hasattr(inner, "get_rope_index"):  # mRoPE (Qwen2-VL, Qwen2.5-VL)
        delta = getattr(inner, "rope_deltas", None)
        delta = torch.zeros(batch, 1, dtype=torch.long) if delta is None else delta.to("cpu").long()
        pos = torch.tensor([[position]]) + delta.expand(batch, 1)
        return pos.to(device).unsqueeze(0).expand(3, batch, 1)
    return torch.full((batch, 1), position, dtype=torch.long, device=device)


@torch.inference_mode()
def teacher_forced_nll(model, inputs: dict, answer: torch.Tensor, cache) -> tuple[float, int]:
    """Summed NLL of ``answer`` ``[n]`` after the prompt, fed one token at a time through ``cache``.

    The prompt goes in one forward (the cache compresses it); answer token ``i`` is then
    fed at its true position ``T + i`` (or where the cache's ``positions`` protocol puts it),
    and the cache applies its decode rule after each.
    Returns ``(nll_sum, n)``.
    """
    inner = getattr(model, "model", None)
    if hasattr(inner, "rope_deltas"):
        inner.rope_deltas = None  # stale deltas from a previous prompt would shift positions
    T = inputs["input_ids"].shape[1]
    out = model(**inputs, cache=cache, logits_to_keep=1)
    logps = [out.logits[0, -1].float().log_softmax(-1)]
    for i in range(len(answer) - 1):
        position = cache.decode_position(T + i) if hasattr(cache, "decode_position") else T + i
        out = model(input_ids=answer[i].view(1, 1), position_ids=decode_position_ids(model, position), cache=cache)
        logps.append(out.logits[0, -1].float().log_softmax(-1))
    nll = -torch.stack(logps).gather(1, answer.view(-1, 1)).sum()
    return float(nll), len(answer)


# ---------------------------------------------------------------- one (method, budget)


def evaluate_sample(model, processor, sample, method: str, budget: float, reference: str | None, params: dict,
                    max_new_tokens: int) -> dict:
    """PPL and ROUGE-L of one method at one budget on one sample: its row of a part.

    ``reference`` is the full cache's generation (None when evaluating the full cache itself:
    its generation is the reference, ROUGE-L 1.0 by definition of the metric).
    """
    from .generation import generate

    inputs, answer, annotations = _prepare(model, processor, sample)  # per evaluation: cheap, no inputs held
    cache = make_cache(method, budget=budget, **params)
    cache.annotate(spans=annotations["spans"])
    nll, n = teacher_forced_nll(model, inputs, answer, cache)
    kept = cache.lengths[-1] / (inputs["input_ids"].shape[1] + n - 1)
    text = generate(model, processor, sample.load_image(), sample.messages, method=method, budget=budget,
                    max_new_tokens=max_new_tokens, **params).text
    reference = text if reference is None else reference
    return {"id": sample.id, "nll": nll, "tokens": n, "ppl": math.exp(nll / n), "kv_kept": kept,
            "text": text, "rouge_l": rouge_l(text, reference)}


def summarize(method: str, budget: float, rows: list[dict], seconds: float) -> dict:
    """The record of one (method, budget) from its per-sample rows, in the samples' order."""
    total_nll, total_tokens = sum(r["nll"] for r in rows), sum(r["tokens"] for r in rows)
    return {
        "method": method,
        "budget": budget,
        "ppl": perplexity(total_nll, total_tokens),
        "rouge_l": sum(r["rouge_l"] for r in rows) / len(rows),
        "samples": len(rows),
        "tokens": total_tokens,
        "ppl_mean": sum(r["ppl"] for r in rows) / len(rows),
        "kv_kept": sum(r["kv_kept"] for r in rows) / len(rows),
        "seconds": seconds,
    }


def evaluate_pair(model, processor, samples, method: str, budget: float, references: list[str] | None,
                  params: dict, max_new_tokens: int, progress=None) -> dict:
    """PPL and ROUGE-L of one method at one budget over ``samples``.

    ``references`` are the full cache's generations (None when evaluating the full cache
    itself). Returns ``{"record": ..., "samples": [...]}``.
    """
    rows, start = [], time.perf_counter()
    for k, sample in enumerate(samples):
        rows.append(evaluate_sample(model, processor, sample, method, budget,
                                    None if references is None else references[k], params, max_new_tokens))
        if progress is not None:
            progress.update(1)
    return {"record": summarize(method, budget, rows, time.perf_counter() - start), "samples": rows}


# ---------------------------------------------------------------- the whole grid

def weights_digest(model, per_tensor: int = 4096) -> str:
    """A short digest of the model's weights: name, shape and the first
    ``per_tensor`` values of every parameter. Cheap even for a 7B model, and any
    retraining changes it, so saved results of other weights are never reused."""
    h = hashlib.sha1()
    for name, p in model.named_parameters():
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(p.detach().flatten()[:per_tensor].float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def _fingerprint(model, model_name: str, data: str, samples, params: dict, max_new_tokens: int) -> dict:
    ids = hashlib.sha1("\n".join(s.id for s in samples).encode()).hexdigest()[:12]
    return {"model": model_name, "weights": weights_digest(model), "data": data, "samples": len(samples),
            "sample_ids": ids, "max_new_tokens": max_new_tokens, **params}


def _part_path(out: Path, name: str, budget: float) -> Path:
    return out / "parts" / f"{name}-{budget:.3f}.json"


def _row_path(out: Path, name: str, budget: float, k: int) -> Path:
    """Where sample ``k``'s row of a pair waits until the pair is whole (under any process count)."""
    return _part_path(out, name, budget).with_suffix("") / f"{k:05d}.json"


def _write_json(path: Path, obj) -> None:
    """Write ``path`` at once: a process killed mid-write leaves no half file to resume from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # missing, or not ours: recompute it
        return None


def _saved_parts(out: Path, variants, fingerprint: dict) -> dict:
    """The whole pairs an earlier run saved under the same settings: ``{(name, budget): part}``."""
    done = {}
    for name, _, budget, options in variants:
        part = _read_json(_part_path(out, name, budget))
        if part and part.get("config") == fingerprint and part["record"].get("options", {}) == options:
            done[(name, budget)] = part
    return done


def _saved_rows(out: Path, variants, fingerprint: dict, samples) -> dict:
    """The single rows saved under the same settings: ``{(name, budget): {k: (row, seconds)}}``."""
    rows = {}
    for name, _, budget, options in variants:
        found = rows[(name, budget)] = {}
        for path in _part_path(out, name, budget).with_suffix("").glob("*.json"):
            k, saved = int(path.stem) if path.stem.isdigit() else -1, _read_json(path)
            if (saved and 0 <= k < len(samples) and saved.get("config") == fingerprint
                    and saved.get("options") == options and saved["row"].get("id") == samples[k].id):
                found[k] = (saved["row"], saved["seconds"])
    return rows


def run(model, processor, samples, methods=METHODS, budgets=DEFAULT_BUDGETS, out=None, model_name="model",
        data="synthetic", max_new_tokens: int = 160, start_size: int = 1, distance: int = -25,
        positions: str = "true", resume: bool = True, progress: bool = True, calibrate: int = 0) -> list[dict]:
    """Evaluate every (method, budget) pair; the full cache once, at budget 1.0.

    ``calibrate`` N > 0 adds ``prefixkv-calibrated``: PrefixKV with per-layer ratios
    averaged over N calibration scenes at each budget (:mod:`elastic.calibrate`; synthetic
    scenes no evaluation uses), as the paper ships them.

    The full cache is always evaluated (its generations are the ROUGE-L references) and
    comes first in the returned records. With ``out`` each sample's result is saved as it
    finishes and, with ``resume``, results already saved under the same settings are not
    recomputed. Under a launcher every process returns the records; the main one writes them.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    variants = [(m, m, float(b), {}) for m in methods if m != "full" for b in budgets]
    params = {"start_size": start_size, "distance": distance}
    if positions != "true":  # only then: results saved before the switch existed still resume
        params["positions"] = positions
    if calibrate:
        variants += calibrated_variants(model, processor, methods, budgets, calibrate, params)
    parts = run_variants(model, processor, samples, variants, out, model_name, data, max_new_tokens, params,
                         resume, progress)
    records = [{**part["record"], "method": part["record"].get("variant", part["record"]["method"])}
               for part in parts]
    if out is not None and distributed.state(cpu=model.device.type == "cpu").is_main_process:
        write_outputs(records, out)
    return records


def calibrated_variants(model, processor, methods, budgets, n: int, params: dict) -> list[tuple]:
    """``("prefixkv-calibrated", "prefixkv", budget, {"ratios": [...]})`` for every budget."""
    from .calibrate import calibration_samples, prefixkv_ratios

    if "prefixkv" not in methods:
        raise ValueError("--calibrate calibrates PrefixKV's ratios: add prefixkv to --methods")
    if n < 1:
        raise ValueError(f"--calibrate needs at least 1 scene, got {n}")
    scenes = calibration_samples(n)
    policy = {k: v for k, v in params.items() if k != "positions"}
    return [("prefixkv-calibrated", "prefixkv", float(b),
             {"ratios": list(prefixkv_ratios(model, processor, scenes, float(b), progress=False, **policy))})
            for b in budgets]  # a list, not a tuple: the options saved as JSON must compare equal on resume


def run_variants(model, processor, samples, variants, out=None, model_name="model", data="synthetic",
                 max_new_tokens: int = 160, params: dict | None = None, resume: bool = True,
                 progress: bool = True) -> list[dict]:
    """Evaluate ``variants``, ``(name, method, budget, options)`` tuples, after the full cache.

    ``params`` go to every policy, ``options`` to one variant's. Returns the parts (record
    and per-sample rows), full cache first, saved and resumed under ``out/parts/NAME-BUDGET.json``.

    Each sample's row is saved under ``out/parts/NAME-BUDGET/K.json`` as soon as it is done;
    when all are, they become the pair's part and are removed. Under a launcher
    (``accelerate launch``, ``torchrun``: :mod:`elastic.distributed`) the samples still to do
    are shared among the processes and the main process writes the parts, the same files as
    one process writes; the rows are per sample, so a run stopped under one process count
    resumes under any other.
    """
    params = dict(params or {"start_size": 1, "distance": -25})
    fingerprint = _fingerprint(model, model_name, data, samples, params, max_new_tokens)
    variants = [("full", "full", 1.0, {})] + [v for v in variants if v[0] != "full"]
    out = Path(out) if out is not None else None
    current = distributed.state(cpu=model.device.type == "cpu")
    world = current.num_processes
    if world > 1 and out is None:
        raise ValueError("several processes share their results through files: pass an output folder")
    saved = resume and out is not None
    done = _saved_parts(out, variants, fingerprint) if saved else {}
    left = [v for v in variants if (v[0], v[2]) not in done]
    rows = _saved_rows(out, left, fingerprint, samples) if saved else {(v[0], v[2]): {} for v in left}
    todo = [k for k in range(len(samples)) if any(k not in got for got in rows.values())]
    distributed.wait(current)  # all have looked before any writes: every process must share out the same todo
    mine = distributed.shard(todo, current)
    jobs = [(v, k) for v in left for k in mine if k not in rows[(v[0], v[2])]]
    if world > 1:
        print(f"process {current.process_index}/{world}: {len(mine)} samples, {len(jobs)} evaluations to do",
              flush=True)
    full = done.get(("full", 1.0), {}).get("samples")
    bar = tqdm(total=len(jobs), desc="evaluate", unit="sample", disable=not progress or not current.is_main_process)
    for (name, method, budget, options), k in jobs:  # the full cache first: its texts are the references
        bar.set_postfix_str(f"{name} {budget:g}")
        reference = None if method == "full" else (full[k] if full else rows[("full", 1.0)][k][0])["text"]
        start = time.perf_counter()
        row = evaluate_sample(model, processor, samples[k], method, budget, reference, {**params, **options},
                              max_new_tokens)
        seconds = time.perf_counter() - start
        rows[(name, budget)][k] = row, seconds
        if out is not None:
            _write_json(_row_path(out, name, budget, k),
                        {"config": fingerprint, "options": options, "row": row, "seconds": seconds})
        bar.update(1)
    bar.close()
    distributed.wait(current)
    if world > 1:  # the other processes' rows
        rows = _saved_rows(out, left, fingerprint, samples)
    parts, new = [], []
    for name, method, budget, options in variants:
        if (name, budget) in done:
            parts.append(done[(name, budget)])
            continue
        got = rows[(name, budget)]
        missing = [samples[k].id for k in range(len(samples)) if k not in got]
        if missing:
            raise RuntimeError(f"{name} at {budget:g}: no result for samples {missing} (did a process fail?)")
        ordered = [got[k] for k in range(len(samples))]
        sample_rows = [row for row, _ in ordered]
        part = {"record": summarize(method, budget, sample_rows, sum(seconds for _, seconds in ordered)),
                "samples": sample_rows, "config": fingerprint}
        if options:
            part["record"].update(variant=name, options=options)
        parts.append(part)
        new.append((name, budget, part))
    distributed.wait(current)  # all have read the rows before the main process removes them
    if out is not None and current.is_main_process:
        for name, budget, part in new:
            _write_json(_part_path(out, name, budget), part)
            folder = _part_path(out, name, budget).with_suffix("")
            for path in folder.glob("*.json"):
                path.unlink(missing_ok=True)
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    return parts


# ---------------------------------------------------------------- outputs

def figure(records: list[dict]):
    """The layout of the paper's Fig. 2: PPL and ROUGE-L vs KV budget, one line per method.

    The full cache does not depend on the budget: it is a dashed horizontal line.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("PPL (lower is better)", "ROUGE-L (higher is better)"))
    colours = {"elastic": "#d62728", "h2o": "#1f77b4", "local": "#2ca02c", "snapkv": "#9467bd", "tova": "#ff7f0e",
               "h2o-ref": "#17becf", "full": "#444444"}
    budgets = sorted({r["budget"] for r in records if r["method"] != "full"}) or [1.0]
    for method in dict.fromkeys(r["method"] for r in records):
        rows = sorted((r for r in records if r["method"] == method), key=lambda r: r["budget"])
        for col, key in ((1, "ppl"), (2, "rouge_l")):
            if method == "full":
                x, y = [budgets[0], budgets[-1]], [rows[0][key]] * 2
                style = dict(mode="lines", line=dict(dash="dash", color=colours["full"]))
            else:
                x, y = [r["budget"] for r in rows], [r[key] for r in rows]
                style = dict(mode="lines+markers", line=dict(color=colours.get(method)))
            fig.add_trace(go.Scatter(x=x, y=y, name=method, legendgroup=method, showlegend=col == 1, **style),
                          row=1, col=col)
    fig.update_xaxes(title_text="KV budget (fraction kept)")
    fig.update_yaxes(title_text="PPL", row=1, col=1)
    fig.update_yaxes(title_text="ROUGE-L F1", row=1, col=2)
    fig.update_layout(template="plotly_white", width=1000, height=420)
    return fig


def write_outputs(records: list[dict], out) -> dict[str, Path]:
    """Write ``results.json``, ``results.csv``, ``figure.html`` (and ``figure.png`` if possible)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "html": out / "figure.html"}
    paths["json"].write_text(json.dumps(records, indent=1) + "\n")
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    fig = figure(records)
    fig.write_html(paths["html"], include_plotlyjs=True)  # embedded: opens offline
    try:
        fig.write_image(out / "figure.png", scale=2)
        paths["png"] = out / "figure.png"
    except Exception as error:  # kaleido (and the Chrome it drives) are optional
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:120]
        print(f"figure.png skipped: plotly image export needs kaleido and Chrome ({detail})")
    return paths


def markdown_table(records: list[dict]) -> str:
    """Records as a markdown table: rows are budgets, columns PPL and ROUGE-L per method."""
    methods = [m for m in dict.fromkeys(r["method"] for r in records) if m != "full"]
    full = next((r for r in records if r["method"] == "full"), None)
    by = {(r["method"], r["budget"]): r for r in records}
    budgets = sorted({r["budget"] for r in records if r["method"] != "full"})
    head = "| budget | " + " | ".join(f"{m} PPL | {m} ROUGE-L" for m in methods) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(methods))]
    for b in budgets:
        cells = []
        for m in methods:
            r = by.get((m, b))
            cells += [f"{r['ppl']:.3f}", f"{r['rouge_l']:.3f}"] if r else ["", ""]
        lines.append(f"| {b:g} | " + " | ".join(cells) + " |")
    if full:
        lines.append(f"\nFull cache: PPL {full['ppl']:.3f}, ROUGE-L {full['rouge_l']:.3f} "
                     f"({full['samples']} samples, {full['tokens']} answer tokens).")
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI

def _floats(values: list[str]) -> list[float]:
    return [float(v) for item in values for v in item.split(",") if v.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m elastic.evaluate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="local path, hub id, scene-smollm2 (the default) or tiny-llava")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ",".join(METHODS))
    ap.add_argument("--budgets", nargs="+", default=None,
                    help="KV budgets in (0, 1], space- or comma-separated (default 0.1 ... 0.9; "
                         "with --ablation one budget, default 0.5)")
    ap.add_argument("--ablation", default=None, choices=("paper", "beyond", "protocol", "all"),
                    help="instead of the method grid: Elastic with one option changed at a time "
                         "(paper: the paper's ablation table; beyond: our variants and the peers; "
                         "protocol: the reference code's H2O and positions; all: every one)")
    ap.add_argument("--samples", type=int, default=None, help="first N samples (synthetic default: 50)")
    ap.add_argument("--data", default="synthetic",
                    help="synthetic (descriptions), synthetic-qa, or a JSON file (MM-Vet or LLaVA format)")
    ap.add_argument("--image-dir", default=None, help="folder of the JSON file's images (default: beside it)")
    ap.add_argument("--out", default=None, help="output folder, parts are resumed from it "
                                                "(default runs/eval, or runs/ablation-NAME)")
    ap.add_argument("--max-new-tokens", type=int, default=160, help="greedy generation length for ROUGE-L")
    ap.add_argument("--positions", default="true", choices=("true", "compressed"),
                    help="decoded tokens at their true positions, or at the compressed cache's length "
                         "(the reference code's protocol, to reproduce the paper's runs)")
    ap.add_argument("--start-size", type=int, default=1)
    ap.add_argument("--distance", type=int, default=-25)
    ap.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA if available)")
    ap.add_argument("--calibrate", type=int, default=0, metavar="N",
                    help="also PrefixKV with per-layer ratios calibrated on N scenes no evaluation uses "
                         "(as prefixkv-calibrated; needs prefixkv in --methods)")
    ap.add_argument("--fresh", action="store_true", help="ignore saved parts and recompute everything")
    return ap.parse_args(argv)


def _params(args) -> dict:
    """Settings every policy gets (``positions`` only when not the default, so results
    saved before it existed still resume)."""
    params = {"start_size": args.start_size, "distance": args.distance}
    return params if args.positions == "true" else {**params, "positions": args.positions}


def main(argv=None) -> list[dict]:
    """The command line; a user mistake ends it with one line ``error: ...``, no traceback."""
    from .models import ModelLoadError

    args = parse_args(argv)
    try:
        return _main(args)
    except (ValueError, OSError, ModelLoadError) as error:  # DatasetError is a ValueError
        raise SystemExit(f"error: {error}") from None


def _main(args) -> list[dict]:
    from .budget import check_budget
    from .models import DEFAULT_MODEL, load_model

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    try:
        budgets = [check_budget(b) for b in _floats(args.budgets)] if args.budgets else None
    except ValueError as error:
        raise ValueError(f"--budgets: {error}") from None
    if args.ablation and budgets and len(budgets) != 1:
        raise ValueError("--ablation runs at one budget: pass a single --budgets value")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    samples = datasets.load(args.data, args.image_dir, args.samples)  # before the model: fail fast
    current = distributed.state(cpu=(args.device or "").startswith("cpu"))  # one process without a launcher
    distributed.split_threads(current)
    model, processor = load_model(args.model, device=distributed.device(current, args.device))
    name = args.model or DEFAULT_MODEL
    if args.ablation:
        from . import ablation

        out = args.out or f"runs/ablation-{args.ablation}"
        parts = run_variants(model, processor, samples, ablation.variants(args.ablation, (budgets or [0.5])[0]),
                             out, name, args.data, args.max_new_tokens, _params(args), resume=not args.fresh)
        rows = ablation.table(parts, args.ablation)
        if current.is_main_process:
            print(ablation.markdown(rows))
            path = ablation.write(rows, out, args.ablation)
            print(f"wrote {path} and {path.with_suffix('.json').name}")
        return rows
    out = args.out or "runs/eval"
    records = run(model, processor, samples, methods, budgets or DEFAULT_BUDGETS, out=out, model_name=name,
                  data=args.data, max_new_tokens=args.max_new_tokens, start_size=args.start_size,
                  distance=args.distance, positions=args.positions, resume=not args.fresh,
                  calibrate=args.calibrate)
    if current.is_main_process:
        print(markdown_table(records))
        print(f"wrote {out}/results.json, results.csv, figure.html")
    return records


if __name__ == "__main__":
    main()
