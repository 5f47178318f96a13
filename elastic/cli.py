"""Console scripts of the ``elastic-cache-explorer`` distribution.

``elastic-eval`` and ``elastic-bench`` run :mod:`elastic.evaluate` and
:mod:`elastic.benchmark` (their ``main`` returns the results; a console script must return
an exit status). ``elastic-app`` runs the Gradio app, which is the repository's ``app.py``,
not part of the wheel: it needs the repository's ``assets/`` (example scenes, the shipped
models). It is looked up in the checkout the package was installed from (an editable
install, or ``pip install <path>``), then in the current directory and its parents.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

DISTRIBUTION = "elastic-cache-explorer"
_NO_APP = (
    "elastic-app runs app.py from a checkout of the Elastic Cache Explorer repository (the app "
    "needs its assets/, which the wheel does not ship), and found none: run it inside the "
    "checkout (cd elastic-cache-explorer && elastic-app), or there: ./run.sh app"
)


def evaluate(argv=None) -> int:
    """``elastic-eval``: PPL and ROUGE-L vs budget (``python -m elastic.evaluate``)."""
    from . import evaluate as module

    module.main(argv)
    return 0


def bench(argv=None) -> int:
    """``elastic-bench``: latency, throughput and memory (``python -m elastic.benchmark``)."""
    from . import benchmark

    benchmark.main(argv)
    return 0


def _installed_from() -> Path | None:
    """The local directory ``pip install`` was given, from PEP 610's ``direct_url.json``."""
    try:
        text = metadata.distribution(DISTRIBUTION).read_text("direct_url.json")
        url = urlparse(json.loads(text)["url"]) if text else None
    except (metadata.PackageNotFoundError, KeyError, ValueError):
        return None
    return Path(unquote(url.path)) if url and url.scheme == "file" else None


def find_app(cwd: Path | None = None) -> Path | None:
    """``app.py`` of a repository checkout (one that has ``elastic/`` beside it), or None."""
    here = Path(__file__).resolve().parent.parent  # the checkout, when not installed into site-packages
    start = (cwd or Path.cwd()).resolve()
    candidates = [here, _installed_from(), start, *start.parents]
    for root in candidates:
        if root is not None and (root / "app.py").is_file() and (root / "elastic" / "__init__.py").is_file():
            return root / "app.py"
    return None


def app(argv=None) -> int:
    """``elastic-app``: the Gradio app (``python app.py``); arguments go to it (``--help``)."""
    path = find_app()
    if path is None:
        print(_NO_APP, file=sys.stderr)
        return 2
    # A separate interpreter with the checkout first on sys.path: the app imports the
    # checkout's elastic and viz, whose model paths point into that checkout's assets/.
    args = sys.argv[1:] if argv is None else list(argv)
    return subprocess.call([sys.executable, str(path), *args], cwd=path.parent)
