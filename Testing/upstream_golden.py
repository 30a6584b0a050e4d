"""The golden files of the upstream-pipeline parity test and the random weights both sides use.

Written by scripts/oracle/make_upstream_golden.py with bowang-lab's MedSAM2 code as the oracle. The weights
are not stored: every tensor is drawn from a generator seeded by its key, so the oracle (which imports this
file) and the test make the same SAM 2.1 tiny model from the key names and shapes alone.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch

UPSTREAM = Path(__file__).parent / "data" / "upstream"
SAM21_TINY = "configs/sam2.1/sam2.1_hiera_t.yaml"
# Moves the object-score logit up, so that the random model keeps the object present and masks are not empty.
PRESENCE_SHIFT = 5.0


def random_weights(keys: list[tuple[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Random float32 weights for ``(name, shape)`` pairs, each a function of its name and shape only."""
    weights = {}
    for name, shape in keys:
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        if len(shape) == 1 and "norm" in name and name.endswith("weight"):
            weights[name] = 1 + 0.2 * torch.randn(shape, generator=g)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[-1]
            weights[name] = torch.randn(shape, generator=g) / max(fan_in, 1) ** 0.5
    weights["sam_mask_decoder.pred_obj_score_head.layers.2.bias"] += PRESENCE_SHIFT
    return weights


def golden_case(name: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The case's description (volume prompt, modality, window) and its arrays."""
    meta = json.loads((UPSTREAM / f"{name}.json").read_text())
    with np.load(UPSTREAM / f"{name}.npz") as arrays:
        return meta, dict(arrays)


def make_volume(case: str) -> np.ndarray:
    """The small test volumes: ``"ct"`` int16 Hounsfield units, ``"mr"`` float32 with a zero background."""
    rng = np.random.default_rng(7)
    z, y, x = np.mgrid[:8, :64, :64]
    organ = ((y - 30) / 16) ** 2 + ((x - 34) / 20) ** 2 + ((z - 4) / 4) ** 2 < 1
    lesion = ((y - 26) / 5) ** 2 + ((x - 40) / 6) ** 2 + ((z - 4) / 2.5) ** 2 < 1
    if case == "ct":
        hu = -80 + 140 * organ + 90 * lesion + rng.normal(0, 25, organ.shape)
        hu[:, :, :6] = -1000  # air at the side
        return hu.round().astype(np.int16)
    body = ((y - 32) / 28) ** 2 + ((x - 32) / 28) ** 2 < 1
    mr = body * (300 + 250 * organ + 400 * lesion + rng.normal(0, 30, organ.shape))
    return np.where(body, mr.clip(1, None), 0).astype(np.float32)
