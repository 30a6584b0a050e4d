#!/usr/bin/env bash
# Creates .venv (once) and installs the engine with its test tools. Torch is pinned to the CPU build that
# this project's machines keep on disk; any torch >= 2.1 works if you install it yourself first.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/pip install -q -e ".[test]"
