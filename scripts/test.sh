#!/usr/bin/env bash
# The test command of the README: installs what is missing, lints, runs the suite (full-size checks excluded).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q -m "not slow" "$@"
