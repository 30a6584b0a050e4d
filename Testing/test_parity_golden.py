"""Parity with the official SAM 2 implementation (sam2==1.1.0), through golden files.

The files in data/golden/ were written by scripts/oracle/make_golden.py with the official package as the oracle:
random weights of a small configuration in the SAM 2.0 and 2.1 flavours, and the oracle's outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import medsam2
from medsam2.frames import FrameStack

GOLDEN = Path(__file__).parent / "data" / "golden"
TOLERANCE = 1e-3


class Golden:
    def __init__(self, folder: Path) -> None:
        self.meta = json.loads((folder / "meta.json").read_text())
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in self.meta["config"].items()}
        self.config = medsam2.ModelConfig(**fields)
        self.model = medsam2.load_model(folder / "weights.safetensors", config=self.config, device="cpu")
        self.frames = np.load(folder / "frames.npy")
        self.single = np.load(folder / "single_frame.npz")
        self.sequence = np.load(folder / "sequence.npz")


@pytest.fixture(scope="module", params=["sam2.0", "sam2.1"])
def golden(request) -> Golden:
    return Golden(GOLDEN / request.param)


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
    assert_close(pred.candidate_logits, ref[f"{prompt}/masks"], f"{prompt} mask logits")
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


def _scenario_mask(rects: list[list[int]], shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for y0, x0, y1, x1 in rects:
        mask[y0:y1, x0:x1] = True
    return mask


def test_two_object_propagation_with_corrections(golden):
    """Two objects, prompts on two frames, forward then reverse, corrections, re-propagation."""
    session = medsam2.Session(golden.model, golden.frames, memory=medsam2.MemoryOptions(policy="recent"))
    ours = {}
    for step, op in enumerate(golden.meta["scenario"]):
        if op["op"] == "prompt":
            mask = _scenario_mask(op["mask"], golden.frames.shape[1:]) if "mask" in op else None
            ours[f"step{step}/prompt"] = session.add_prompt(
                op["frame"],
                obj_id=op["obj_id"],
                points=op.get("points"),
                labels=op.get("labels"),
                box=op.get("box"),
                mask=mask,
            )
        else:
            for t, logits in session.propagate(start=op["start"], reverse=op["reverse"]):
                for obj_id, frame_logits in logits.items():
                    ours[f"step{step}/frame{t}/obj{obj_id}"] = frame_logits
    assert sorted(ours) == sorted(golden.sequence.files)
    for key in golden.sequence.files:
        assert_close(ours[key], golden.sequence[key], key)
