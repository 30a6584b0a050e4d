"""The golden files of the parity tests: the tiny random-weight models and the oracle's scenario.

Written by scripts/oracle/make_golden.py with the official SAM 2 package as the oracle. Also used by
scripts/gpu_check.py to replay the scenario on a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import medsam2

GOLDEN = Path(__file__).parent / "data" / "golden"


def golden_meta(flavour: str = "sam2.1") -> dict:
    return json.loads((GOLDEN / flavour / "meta.json").read_text())


def golden_config(flavour: str = "sam2.1") -> medsam2.ModelConfig:
    fields = golden_meta(flavour)["config"]
    return medsam2.ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def golden_model(
    flavour: str = "sam2.1", presence_shift: float = 0.0, device: str = "cpu", dtype: str | None = None
) -> medsam2.SAM2Model:
    """The tiny model; ``presence_shift`` moves its object-score logit (e.g. +5: objects stay present)."""
    model = medsam2.load_model(
        GOLDEN / flavour / "weights.safetensors", config=golden_config(flavour), device=device, dtype=dtype
    )
    if presence_shift:
        with torch.no_grad():
            model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias += presence_shift
    return model


def scenario_mask(rects: list[list[int]], shape: tuple[int, int]) -> np.ndarray:
    """A boolean mask made of ``[y0, x0, y1, x1]`` rectangles."""
    mask = np.zeros(shape, dtype=bool)
    for y0, x0, y1, x1 in rects:
        mask[y0:y1, x0:x1] = True
    return mask


def replay_scenario(session: medsam2.Session, scenario: list[dict]) -> dict[str, np.ndarray]:
    """Run the oracle's prompt/propagate steps on ``session``; outputs keyed as in ``sequence.npz``."""
    shape = (session.frames.height, session.frames.width)
    out = {}
    for step, op in enumerate(scenario):
        if op["op"] == "prompt":
            mask = scenario_mask(op["mask"], shape) if "mask" in op else None
            out[f"step{step}/prompt"] = session.add_prompt(
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
                    out[f"step{step}/frame{t}/obj{obj_id}"] = frame_logits
    return out


def box_tracking_model() -> medsam2.SAM2Model:
    """The tiny model with objects always present, tracking with the previous slice's box as medsam2-lite does."""
    model = golden_model(presence_shift=5.0)
    model.config = model.config.replace(tracking_box_margin=0.05)
    return model


def generated_held_out_volume(shape: tuple[int, int, int]):
    """A held-out volume for the evaluation's tests: an ellipsoid "organ" (label 3) in a noisy CT-like volume."""
    from medsam2.train.heldout import HeldOutVolume

    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    organ = ((z - 4) / 3.5) ** 2 + ((y - 12) / 7) ** 2 + ((x - 15) / 9) ** 2 < 1
    image = np.where(organ, 60.0, -100.0) + np.random.default_rng(0).normal(0, 10, organ.shape)
    labels = organ.astype(np.uint8) * 3
    return HeldOutVolume("generated", image.astype(np.float32), (2.0, 1.0, 1.0), "ct", labels, {"organ": 3})


def recorded_tracking_prompts(model: medsam2.SAM2Model) -> list:
    """Make ``model.predict`` record the box prompts of every tracked-frame call, ``[points, *more_boxes]``
    (``None`` without points; the call still runs)."""
    calls = []
    predict = model.predict

    def recording(features, context, points=None, mask=None, previous_logits=None, more_boxes=()):
        if context is not None and context.frames and mask is None and previous_logits is None:
            calls.append(None if points is None else [points, *more_boxes])
        return predict(
            features,
            context,
            points=points,
            mask=mask,
            previous_logits=previous_logits,
            more_boxes=more_boxes,
        )

    model.predict = recording
    return calls
