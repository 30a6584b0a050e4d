"""bfloat16 autocast, the precision of the GPU path, run on the CPU so that CI exercises it.

The model's weights stay float32; matmuls and convolutions run in bfloat16 under autocast, and memory features
are stored in bfloat16 as on a GPU. Masks must agree with the float32 run on at least 98 % of the pixels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from golden import GOLDEN, golden_config

import medsam2
from medsam2 import MedSAM2Error

T, H, W = 10, 48, 56
MIN_AGREEMENT = 0.98


def load(dtype: str | None) -> medsam2.SAM2Model:
    model = medsam2.load_model(
        GOLDEN / "sam2.1" / "weights.safetensors",
        config=golden_config(),
        device="cpu",
        dtype=dtype,
        allow_cpu_autocast=dtype is not None,
    )
    with torch.no_grad():  # objects stay present, so that there are masks to compare
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias += 5.0
    return model


@pytest.fixture(scope="module")
def models() -> dict[str, medsam2.SAM2Model]:
    return {"float32": load(None), "bfloat16": load("bfloat16")}


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    rng = np.random.default_rng(3)
    z, y, x = np.mgrid[:T, :H, :W]
    blob = ((y - 22 - z) ** 2 / 90 + (x - 26) ** 2 / 120 + (z - 5) ** 2 / 30) < 1
    return (0.2 + 0.6 * blob + rng.normal(0, 0.04, blob.shape)).clip(0, 1).astype(np.float32)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


def test_cpu_autocast_needs_the_explicit_option():
    with pytest.raises(MedSAM2Error, match="allow_cpu_autocast=True"):
        medsam2.load_model(GOLDEN / "sam2.1" / "weights.safetensors", config=golden_config(), device="cpu",
                           dtype="bfloat16")  # fmt: skip
    with pytest.raises(MedSAM2Error, match="CUDA only"):
        medsam2.load_model(GOLDEN / "sam2.1" / "weights.safetensors", config=golden_config(), device="cpu",
                           dtype="float16", allow_cpu_autocast=True)  # fmt: skip


def test_session_in_bfloat16_agrees_with_float32(models, volume):
    masks = {}
    for name, model in models.items():
        session = medsam2.Session(
            model, volume, memory=medsam2.MemoryOptions(policy="recent", storage_dtype="bfloat16")
        )
        session.add_prompt(5, box=(12, 8, 42, 38))
        masks[name] = np.stack([out[1] > 0 for _, out in sorted(session.propagate(start=5))]
                               + [out[1] > 0 for _, out in session.propagate(start=5, reverse=True)])  # fmt: skip
        if name == "bfloat16":
            memories = [r.memory for r in session.tracks[1].tracked.values() if r.memory is not None]
            assert memories and all(m.features.dtype == torch.bfloat16 for m in memories)
    assert masks["float32"].any()
    assert agreement(masks["float32"], masks["bfloat16"]) >= MIN_AGREEMENT


def test_segment_volume_in_bfloat16_agrees_with_float32(models, volume):
    labels = {
        name: medsam2.segment_volume(
            model,
            volume,
            [medsam2.Prompt(axis=0, index=5, box=(12, 8, 42, 38))],
            modality="other",
            memory=medsam2.MemoryOptions(storage_dtype="bfloat16"),
        ).labels
        for name, model in models.items()
    }
    assert labels["float32"].any()
    assert agreement(labels["float32"], labels["bfloat16"]) >= MIN_AGREEMENT
