"""The distribution: build the wheel from a copy of the sources and use it with no
repository on the path (the core without its optional dependencies)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The single source of the version, read without importing torch (several seconds).
VERSION = next(node.value.value for node in ast.parse((ROOT / "elastic" / "__init__.py").read_text()).body
               if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "__version__")

# Run in a fresh interpreter from the installed wheel only; the optional dependencies are
# made unimportable, so the library core must not need them.
CHILD = r"""
import sys
for name in ("gradio", "plotly", "rouge_score"):
    sys.modules[name] = None
from pathlib import Path
import elastic, elastic.cli, elastic.benchmark, elastic.evaluate, elastic.tiny.data
import torch
from transformers import LlamaConfig, LlamaForCausalLM

repo, site = Path(sys.argv[1]), Path(sys.argv[2])  # argv[3]: the version in the sources
assert elastic.__version__ == sys.argv[3], elastic.__version__
assert Path(elastic.__file__).resolve().is_relative_to(site), elastic.__file__
assert not Path(elastic.__file__).resolve().is_relative_to(repo)
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1)).eval()
elastic.attach(model)
cache = elastic.make_cache("elastic", budget=0.5)
ids = torch.arange(4, 24)[None]
out = model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=4, min_new_tokens=4,
                     do_sample=False)
assert out.shape == (1, 24) and cache.lengths[0] == 10, cache.lengths
try:
    elastic.rouge_l("a", "b")
    raise AssertionError("rouge-score was blocked")
except ImportError as error:
    assert "elastic-cache-explorer[eval]" in str(error)
assert elastic.cli.find_app() is None  # no checkout here: elastic-app explains instead
assert elastic.cli.find_app(repo) == repo / "app.py"
print("ok", elastic.__file__)
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build from a copy, so that nothing (build/, *.egg-info) is written into the checkout."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("elastic", "viz"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(tmp / "dist")], check=True, cwd=tmp)
    (built,) = (tmp / "dist").glob("*.whl")
    return built


def test_wheel_contents_and_metadata(wheel):
    assert VERSION == "0.2.0"
    assert wheel.name == f"elastic_cache_explorer-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = f"elastic_cache_explorer-{VERSION}.dist-info"
        metadata = z.read(f"{info}/METADATA").decode()
        scripts = z.read(f"{info}/entry_points.txt").decode()
    for module in ("elastic/__init__.py", "elastic/cache.py", "elastic/cli.py", "elastic/tiny/data.py",
                   "elastic/policies/__init__.py", "elastic/policies/snapkv.py", "elastic/ablation.py",
                   "viz/__init__.py"):
        assert module in names
    assert not any(n.startswith(("tests/", "app.py", "assets/", "bench/")) for n in names)
    assert "Requires-Dist: torch==2.13.0" in metadata and "Requires-Dist: transformers==5.24.0" in metadata
    assert 'Requires-Dist: gradio==6.31.0; extra == "app"' in metadata
    assert 'Requires-Dist: rouge-score==0.1.2; extra == "eval"' in metadata
    for line in ("elastic-app = elastic.cli:app", "elastic-eval = elastic.cli:evaluate",
                 "elastic-bench = elastic.cli:bench"):
        assert line in scripts


def test_wheel_imports_in_a_clean_environment(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                    str(wheel)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(site)  # the venv's site-packages still provide torch & co.
    done = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(site), VERSION], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")
