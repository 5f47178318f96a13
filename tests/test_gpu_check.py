"""Smoke test of bench/gpu_check.py on a tiny random LLaVA (CPU): the table it prints, and
its KV bytes against the memory calculator and a hand computation."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from elastic import memory

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
COLUMNS = ["batch", "prompt + new", "method", "budget", "latency (s)", "throughput (tok/s)", "speed-up",
           "prefill (s)", "prefill / full", "decode (tok/s)", "decode / full", "peak mem (MB)", "KV (MB)", "KV / full"]
# The tiny model by hand (gpu_check.TINY_TEXT): 2 layers, 4 KV heads of 16, float32 (4 bytes).
TINY_ENTRY = 2 * 2 * 4 * 16 * 4  # bytes of one token in every layer
TINY = memory.ModelShape(name="tiny", model_type="llava", layers=2, heads=4, kv_heads=4, head_dim=16, hidden=64,
                         parameters=0, context=4096, config_dir=ROOT)


def table_rows(text: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], cells[1:]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout, json.loads(out.read_text())


def test_table_rows_and_columns(smoke):
    text, _ = smoke
    head, rows = table_rows(text)
    assert head == COLUMNS
    expected = [(batch, label, budget) for batch in ("1", "8")
                for label, budget in [("full (DynamicCache)", "1"), ("full", "1"), ("elastic", "0.2"),
                                      ("elastic", "0.5"), ("h2o", "0.2"), ("h2o", "0.5")]]
    assert [(r[0], r[2], r[3]) for r in rows] == expected
    assert {r[1] for r in rows} == {"64 + 16"}
    assert all(float(r[4]) > 0 and float(r[5]) > 0 for r in rows)
    assert "prompt 64 tokens = 5 system + 16 image + 43 instruction" in text
    assert "KV bytes of every row match elastic.memory" in text


def test_kv_bytes_agree_with_the_calculator(smoke):
    text, data = smoke
    _, rows = table_rows(text)
    results = data["results"]
    assert len(results) == len(rows) == 12
    for m, row in zip(results, rows):
        (calc,) = memory.rows(TINY, [64], [m["batch"]], [m["method"]], [m["budget"]], 16, "float32", system=5, image=16)
        assert m["kv_bytes"] == calc.kv_bytes, (m["method"], m["budget"], m["batch"])
        assert row[12] == f"{calc.kv_bytes / 2**20:.1f}"
    # By hand: the full cache holds 64 + 15 tokens; Elastic 0.2 ceil(0.2 * 79) = 16.
    full = [m for m in results if m["method"] == "full" and m["batch"] == 8]
    assert [m["kv_bytes"] for m in full] == [8 * 79 * TINY_ENTRY] * 2
    (e,) = [m for m in results if (m["method"], m["budget"], m["batch"]) == ("elastic", 0.2, 1)]
    assert e["kv_bytes"] == 16 * TINY_ENTRY


def test_time_limit_skips_runs(capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main(["--device", "cpu", "--tiny", "--batch", "1", "--methods", "elastic", "--budgets", "0.2",
                           "--time-limit", "0"]) == 1  # the build alone is past the limit: nothing runs
    text = capsys.readouterr().out
    assert text.count("skipped (time limit)") == 3 and "nothing was measured" in text
