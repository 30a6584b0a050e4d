"""FrameStack follows each model's input conventions (SAM 2 stretch + ImageNet; LiteMedSAM longest side + pad)."""

from __future__ import annotations

import numpy as np
import torch

import medsam2
from medsam2.frames import PIXEL_MEAN, PIXEL_STD, FrameStack

LITE = medsam2.ModelConfig.preset("medsam2_lite")


def _frames() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform(0.2, 0.7, size=(2, 32, 64)).astype(np.float32)  # twice as wide as tall


def test_lite_input_keeps_the_aspect_ratio_pads_and_scales_to_unit_range():
    stack = FrameStack(_frames(), LITE)
    assert stack.content == (128, 256)
    x = stack.model_input(0, torch.device("cpu"))
    assert x.shape == (1, 3, 256, 256)
    assert float(x[..., :128, :].min()) == 0.0 and float(x[..., :128, :].max()) == 1.0
    assert not x[..., 128:, :].any()  # zero padding at the bottom


def test_lite_coordinates_masks_and_logits_round_trip():
    stack = FrameStack(_frames(), LITE)
    np.testing.assert_allclose(stack.to_model_coords([[64, 32], [10, 8]]), [[256, 128], [40, 32]])
    mask = np.zeros((32, 64), bool)
    mask[8:24, 16:40] = True
    model_mask = stack.mask_to_model(mask, torch.device("cpu"))
    assert model_mask.shape == (1, 1, 256, 256) and not model_mask[..., 128:, :].any()
    back = stack.logits_to_frame(model_mask * 20 - 10)[0].numpy() > 0
    np.testing.assert_array_equal(back, mask)


def test_sam2_input_is_stretched_and_imagenet_normalised():
    config = medsam2.ModelConfig.preset("sam2.1_hiera_t", image_size=128)
    frames = np.full((1, 32, 64), 0.5, np.float32)
    x = FrameStack(frames, config).model_input(0, torch.device("cpu"))
    expected = (0.5 - np.array(PIXEL_MEAN)) / np.array(PIXEL_STD)
    np.testing.assert_allclose(x[0, :, 5, 5].numpy(), expected, rtol=1e-6)
    assert x.shape == (1, 3, 128, 128)
