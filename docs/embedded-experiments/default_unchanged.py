"""Is the default Elastic Cache unchanged since an older commit? Same tokens on the shipped model.

    ./run.sh python docs/embedded-experiments/default_unchanged.py 6287c8c^

Checks out ``REF`` into a temporary git worktree, answers the app's four examples there and
here with Elastic Cache at budgets 0.3 and 0.5 (60 new tokens, the shipped SmolLM2 with
eyes), each in its own process, and prints whether every answer is the same. Not a test: it
needs the repository's history.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ANSWER = """
import json, sys, torch, elastic
torch.set_num_threads(1)
model, processor = elastic.load_model("scene-smollm2", device="cpu")
examples = json.load(open(sys.argv[1] + "/examples.json"))
out = {}
for e in examples:
    for budget in (0.3, 0.5):
        out[f"{e['image']} {budget}"] = elastic.generate(model, processor, sys.argv[1] + "/" + e["image"],
            e["prompt"], method="elastic", budget=budget, max_new_tokens=60).text
print(json.dumps(out))
"""


def answers(code_root: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", ANSWER, str(ROOT / "assets" / "examples")], cwd=code_root,
                         env={**os.environ, "PYTHONPATH": str(code_root)}, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(ref: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", folder, ref], check=True,
                       capture_output=True)
        try:
            before = answers(Path(folder))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", folder], capture_output=True)
    now = answers(ROOT)
    same = [k for k in before if before[k] == now.get(k)]
    print(f"{len(same)} of {len(before)} answers identical to {ref}")
    for k in before:
        if before[k] != now.get(k):
            print(f"  differs: {k}\n    before: {before[k]!r}\n    now:    {now.get(k)!r}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "6287c8c^")
