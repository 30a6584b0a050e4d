"""scripts/gpu_check.py, the one-command GPU check, tried out on the CPU at a tiny size.

No GPU is lent to most sessions: this keeps the script runnable for the one that gets one. On the CPU its
"bf16" run is float32 again, so both parity rows must match the oracle as the CPU parity tests do.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--depth", "4", "--size", "32"]
    done = subprocess.run(
        [*command, "--image-size", "128", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    for parity in (report["parity_float32"], report["parity_bf16"]):
        for flavour in ("sam2.0", "sam2.1"):
            assert parity[flavour]["max_abs_logit_diff"] < 1e-3 and parity[flavour]["min_mask_iou"] > 0.99
    for run in (report["speed_float32"], report["speed_bf16"]):
        # Six orientations over every slice without early stop: 4 + 1 axial, 32 + 1 coronal and sagittal.
        assert run["frames_visited"] == 5 + 33 + 33
        assert run["seconds_6_orientations"] > 0 and run["peak_gpu_memory_gib"] is None
    table = (tmp_path / "gpu_check.md").read_text()
    assert "no GPU (CPU try-out)" in table and "| golden sam2.1:" in table
