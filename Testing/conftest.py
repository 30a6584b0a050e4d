"""Shared test settings."""

from __future__ import annotations

import os

import torch

# The suite runs tiny models, for which extra threads only add synchronisation cost; on a loaded 2-core
# machine they made the tests 20x slower. MEDSAM2_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("MEDSAM2_TEST_THREADS", "1")))
