"""Several processes over one evaluation (elastic.distributed): two CPU processes (gloo, started by
``accelerate launch``) write what one process writes, and a stopped run resumes under another count."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from elastic import distributed, evaluate

ROOT = Path(__file__).resolve().parents[1]
GRID = ["--model", "tiny-llava", "--methods", "elastic,h2o", "--budgets", "0.5", "--samples", "4",
        "--max-new-tokens", "4", "--device", "cpu"]
TINY = ["--model", "tiny-llava", "--n", "2", "--qa-per-scene", "1", "--method", "h2o", "--budget", "0.5",
        "--threads", "1"]



@pytest.fixture(autouse=True)
def one_thread():
    """The in-process runs use one thread, as every launched process does here (2 cores, 2
    processes): the same reduction order, so the outputs can be compared exactly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **extra}


def launch(module: str, args: list[str], processes: int = 2) -> str:
    """``accelerate launch --multi_gpu --num_processes N -m module args`` (its torchrun launcher, which
    starts several processes on CPUs too; ``--cpu`` would start one); returns the output."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "0", "-m", module, *args]
    done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def spawn(module: str, args: list[str], processes: int = 2) -> list[str]:
    """The processes a launcher would start, started directly with torch.distributed's variables
    (a few seconds faster than :func:`launch`); returns each one's output."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    running = [subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True,
                                env=_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                                         LOCAL_RANK=str(rank), WORLD_SIZE=str(processes),
                                         LOCAL_WORLD_SIZE=str(processes)))
               for rank in range(processes)]
    printed = [process.communicate(timeout=600)[0] for process in running]
    for process, text in zip(running, printed):
        assert process.returncode == 0, text[-3000:]
    return printed


def without_seconds(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def outputs(out: Path) -> dict:
    """Everything a run leaves that does not depend on timing: results, the CSV and every part."""
    csv = [",".join(line.split(",")[:-1]) for line in (out / "results.csv").read_text().splitlines()]
    parts = {}
    for path in sorted((out / "parts").iterdir()):
        assert path.is_file(), f"{path} left behind"  # the per-sample rows are joined and removed
        part = json.loads(path.read_text())
        parts[path.name] = {"config": part["config"], "samples": part["samples"],
                            "record": without_seconds([part["record"]])[0]}
    return {"results": without_seconds(json.loads((out / "results.json").read_text())), "csv": csv, "parts": parts}


def counting(monkeypatch, stop_after: int | None = None) -> list:
    """Count evaluate_sample calls; with ``stop_after``, fail the next one as a killed run would stop."""
    calls, real = [], evaluate.evaluate_sample

    def wrapped(*args, **kwargs):
        if stop_after is not None and len(calls) == stop_after:
            raise RuntimeError("killed")
        calls.append(args[3:5])
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_sample", wrapped)
    return calls


def test_two_processes_write_what_one_writes_and_resume_under_another_count(tmp_path, monkeypatch, capsys):
    one, shared = tmp_path / "one", tmp_path / "shared"
    records = evaluate.main(GRID + ["--out", str(one)])
    table = evaluate.markdown_table(records)

    # One process stopped after two evaluations: the full cache on samples 0 and 1, saved as rows.
    with pytest.raises(RuntimeError, match="killed"), monkeypatch.context() as patch:
        counting(patch, stop_after=2)
        evaluate.main(GRID + ["--out", str(shared)])
    assert sorted(p.name for p in (shared / "parts" / "full-1.000").iterdir()) == ["00000.json", "00001.json"]
    assert not list((shared / "parts").glob("*.json")) and not (shared / "results.json").exists()
    capsys.readouterr()

    # Two processes take it up: every sample misses something, so each takes two; the rest of
    # the 12 evaluations are done once, and sample 0's reference comes from the first run's row.
    printed = launch("elastic.evaluate", GRID + ["--out", str(shared)])
    shares = {int(r): (int(s), int(e)) for r, s, e in re.findall(r"process (\d)/2: (\d+) samples, (\d+) evaluations",
                                                                  printed)}
    assert shares == {0: (2, 5), 1: (2, 5)}
    assert printed.count(table) == 1  # the main process alone prints (and writes)
    assert outputs(shared) == outputs(one)

    # ...and one process resumes what two left: only the deleted pair is recomputed.
    (shared / "parts" / "h2o-0.500.json").unlink()
    (shared / "results.json").unlink()
    calls = counting(monkeypatch)
    again = evaluate.main(GRID + ["--out", str(shared)])
    assert calls == [("h2o", 0.5)] * 4
    assert without_seconds(again) == without_seconds(records)
    assert outputs(shared) == outputs(one)


def test_ablation_under_two_processes(tmp_path):
    args = ["--model", "tiny-llava", "--ablation", "protocol", "--samples", "2", "--max-new-tokens", "3",
            "--device", "cpu"]
    rows = evaluate.main(args + ["--out", str(tmp_path / "one")])
    printed = spawn("elastic.evaluate", args + ["--out", str(tmp_path / "two")])
    assert ["1 samples, 6 evaluations" in text for text in printed] == [True, True]
    assert ["ablation-protocol.md" in text for text in printed] == [True, False]  # the main process writes
    assert json.loads((tmp_path / "two" / "ablation-protocol.json").read_text()) == json.loads(json.dumps(rows))
    markdown = [(tmp_path / name / "ablation-protocol.md").read_text() for name in ("one", "two")]
    assert markdown[0] == markdown[1]


def test_tiny_evaluate_under_two_processes(tmp_path):
    from elastic.tiny import evaluate as tiny

    threads = torch.get_num_threads()
    try:
        tiny.main(TINY + ["--json", str(tmp_path / "one.json")])
    finally:
        torch.set_num_threads(threads)
    printed = spawn("elastic.tiny.evaluate", TINY + ["--json", str(tmp_path / "two.json")])
    assert ["accuracy=" in text for text in printed] == [True, False]  # the main process reports
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert {**two, "args": {**two["args"], "json": None}} == {**one, "args": {**one["args"], "json": None}}
    # Not vacuous: the two scenes score differently, so one process's share alone would not give this.
    assert 0 < one["accuracy"] < 0.5 and len(one["qa_by_kind"]) == 2


def test_helpers_in_one_and_several_processes(monkeypatch):
    alone = distributed.state(cpu=True)  # no launcher here
    assert (alone.num_processes, alone.process_index, alone.is_main_process) == (1, 0, True)
    assert distributed.shard(range(5), alone) == [0, 1, 2, 3, 4] and distributed.gather([7, 8], alone) == [7, 8]
    assert distributed.device(alone, None) is None and distributed.device(alone, "cuda") == "cuda"
    assert distributed.split_threads(alone) is None

    second = SimpleNamespace(num_processes=3, process_index=1, device=torch.device("cuda", 1))
    assert distributed.shard(range(8), second) == [1, 4, 7]
    assert distributed.device(second, None) == distributed.device(second, "cuda") == "cuda:1"  # not spread
    assert distributed.device(second, "cuda:0") == "cuda:0"
    assert distributed.device(SimpleNamespace(num_processes=2, device=torch.device("cpu", 0)), None) == "cpu"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    threads = torch.get_num_threads()
    try:
        assert distributed.split_threads(second, total=7) == 3 == torch.get_num_threads()
        assert distributed.split_threads(second, total=1) == 1
    finally:
        torch.set_num_threads(threads)
