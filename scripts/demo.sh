#!/usr/bin/env bash
# The main job of the README: segment both lungs of a real chest CT (slicerio's CTChest4) from one box each with
# the offline default model medsam2-lite; writes medsam2-demo/CTChest4-medsam2.seg.nrrd and a PNG preview and
# prints Dice / HD95 against the bundled reference. Extra arguments go to `medsam2 demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/medsam2 demo "$@"
