"""Parity with the official SAM 2 implementation (sam2==1.1.0), through golden files.

The files in data/golden/ were written by scripts/oracle/make_golden.py with the official package as the oracle:
random weights of a small configuration in the SAM 2.0 and 2.1 flavours, and the oracle's outputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from golden import GOLDEN, golden_meta, golden_model, replay_scenario

import medsam2
from medsam2.frames import FrameStack
from medsam2.model.sam2 import NO_OBJECT_LOGIT

TOLERANCE = 1e-3


class Golden:
    def __init__(self, flavour: str) -> None:
        self.meta = golden_meta(flavour)
        self.model = golden_model(flavour)
        self.frames = np.load(GOLDEN / flavour / "frames.npy")
        self.single = np.load(GOLDEN / flavour / "single_frame.npz")
        self.sequence = np.load(GOLDEN / flavour / "sequence.npz")


@pytest.fixture(scope="module", params=["sam2.0", "sam2.1"])
def golden(request) -> Golden:
    return Golden(request.param)


def assert_close(ours: torch.Tensor | np.ndarray, reference: np.ndarray, what: str) -> None:
    ours = ours.detach().float().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    assert ours.shape == reference.shape, f"{what}: shape {ours.shape} vs oracle {reference.shape}"
    diff = float(np.abs(ours - reference).max())
    assert diff <= TOLERANCE, f"{what}: max abs difference {diff:.2e} > {TOLERANCE}"


def test_golden_model_version_matches_flavour(golden):
    expected = golden.meta["config"]["no_obj_embed_spatial"]
    assert (golden.model.no_obj_embed_spatial is not None) == expected
    assert (golden.model.obj_ptr_tpos_proj is not None) == expected


@pytest.mark.parametrize("prompt", ["box", "click", "clicks"])
def test_single_frame_point_prompts(golden, prompt):
    model, ref = golden.model, golden.single
    stack = FrameStack(golden.frames, model.config)
    with torch.inference_mode():
        features = model.encode_image(stack.model_input(3, model.device))
        points = (torch.from_numpy(ref[f"{prompt}/coords"]), torch.from_numpy(ref[f"{prompt}/labels"]))
        pred = model.predict(features, None, points=points)
    # The oracle gives an absent object's masks the no-object fill; our candidates are kept before it.
    filled = torch.where(pred.object_score[:, :, None, None] > 0, pred.candidate_logits, NO_OBJECT_LOGIT)
    assert_close(filled, ref[f"{prompt}/masks"], f"{prompt} mask logits")
    assert_close(pred.candidate_ious, ref[f"{prompt}/ious"], f"{prompt} IoU predictions")
    assert_close(pred.object_score, ref[f"{prompt}/object_score"], f"{prompt} object score")
    assert_close(pred.obj_ptr, ref[f"{prompt}/obj_ptr"], f"{prompt} object pointer")


def test_single_frame_mask_prompt(golden):
    model, ref = golden.model, golden.single
    stack = FrameStack(golden.frames, model.config)
    with torch.inference_mode():
        features = model.encode_image(stack.model_input(3, model.device))
        pred = model.predict(features, None, mask=torch.from_numpy(ref["mask/input"]))
    assert_close(pred.low_res_logits, ref["mask/low_res"], "mask prompt low-res logits")
    assert_close(pred.high_res_logits, ref["mask/high_res"], "mask prompt high-res logits")
    assert_close(pred.object_score, ref["mask/object_score"], "mask prompt object score")
    assert_close(pred.obj_ptr, ref["mask/obj_ptr"], "mask prompt object pointer")


def test_two_object_propagation_with_corrections(golden):
    """Two objects, prompts on two frames, forward then reverse, corrections, re-propagation."""
    session = medsam2.Session(golden.model, golden.frames, memory=medsam2.MemoryOptions(policy="recent"))
    ours = replay_scenario(session, golden.meta["scenario"])
    assert sorted(ours) == sorted(golden.sequence.files)
    for key in golden.sequence.files:
        assert_close(ours[key], golden.sequence[key], key)
