"""medsam2.segment_images: one prompted template, a list of unrelated 2D images of any size, gray or RGB.

Runs the tiny random-weight SAM 2.1 model of the golden files (presence head shifted so that objects are
tracked as present). The template's mask prompt comes back as its own mask: that is the checkable answer.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from golden import golden_model

import medsam2
from medsam2 import InputError


@pytest.fixture(scope="module")
def model() -> medsam2.SAM2Model:
    return golden_model(presence_shift=5.0)


def _disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    y, x = np.mgrid[: shape[0], : shape[1]]
    return (y - centre[0]) ** 2 + (x - centre[1]) ** 2 < radius**2


def _images() -> list[np.ndarray]:
    """Five unrelated images: sizes, gray/RGB and dtypes all differ; each shows a bright disc."""
    rng = np.random.default_rng(2)
    gray_u8 = (60 + 150 * _disc((40, 56), (15, 20), 8) + rng.integers(0, 20, (40, 56))).astype(np.uint8)
    rgb_u8 = np.repeat((50 + 160 * _disc((33, 29), (20, 12), 7))[..., None], 3, axis=-1).astype(np.uint8)
    rgb_u8[..., 2] //= 2
    gray_f = (0.1 + 0.7 * _disc((64, 48), (30, 30), 12) + rng.normal(0, 0.02, (64, 48))).astype(np.float32)
    rgb_f = np.stack([_disc((25, 70), (12, 40), 6) * c for c in (0.9, 0.5, 0.2)], axis=-1).astype(np.float64)
    gray_i16 = (-200 + 900 * _disc((48, 36), (24, 18), 9)).astype(np.int16)
    return [gray_u8, rgb_u8, gray_f, rgb_f, gray_i16]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.mark.parametrize("template", [0, 2, 4])
def test_one_boolean_mask_per_image_at_its_size_and_the_template_keeps_its_mask(model, template):
    images = _images()
    before = [image.copy() for image in images]
    prompt = _disc(
        images[template].shape[:2], (images[template].shape[0] / 2, images[template].shape[1] / 3), 7
    )
    masks = medsam2.segment_images(model, images, template=template, mask=prompt)
    assert len(masks) == len(images)
    for image, mask in zip(images, masks):
        assert mask.dtype == bool and mask.shape == image.shape[:2]
    assert _iou(masks[template], prompt) > 0.9
    assert all(np.array_equal(a, b) for a, b in zip(images, before))  # the inputs are left as they were


def test_clicks_and_boxes_on_the_template(model):
    images = _images()
    by_box = medsam2.segment_images(model, images, template=1, box=(5, 13, 19, 27))
    by_click = medsam2.segment_images(model, images, template=1, points=[(12, 20), (2, 2)], labels=[1, 0])
    for masks in (by_box, by_click):
        assert [m.shape for m in masks] == [i.shape[:2] for i in images]


def test_a_single_image_and_an_rgba_image(model):
    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[..., :3] = (80 + 150 * _disc((30, 40), (12, 25), 6))[..., None]
    rgba[..., 3] = 255
    mask = _disc((30, 40), (12, 25), 6)
    (only,) = medsam2.segment_images(model, [rgba], mask=mask)
    assert only.shape == (30, 40) and _iou(only, mask) > 0.9


def test_same_seed_same_masks(model):
    images = _images() * 2
    first = medsam2.segment_images(model, images, box=(10, 5, 30, 25), seed=4)
    again = medsam2.segment_images(model, images, box=(10, 5, 30, 25), seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))


def test_cancel_and_progress(model):
    images = _images()
    cancel = threading.Event()
    calls = []

    def progress(done, total, message):
        calls.append((done, total))
        if done == 2:
            cancel.set()

    with pytest.raises(medsam2.Cancelled):
        medsam2.segment_images(model, images, box=(10, 5, 30, 25), progress=progress, cancel=cancel)
    assert calls == [(1, 5), (2, 5)]


@pytest.mark.parametrize(
    "images, prompt, message",
    [
        ([], {"box": (1, 1, 5, 5)}, "at least one image"),
        (
            [np.zeros((4, 5, 6, 3))],
            {"box": (1, 1, 3, 3)},
            r"Image 0 must be \[H, W\] gray or \[H, W, 3\] colour",
        ),
        ([np.eye(9), np.zeros((9, 9, 2))], {"box": (1, 1, 3, 3)}, "Image 1 must be"),
        ([np.ones((9, 1))], {"box": (0, 0, 1, 1)}, "Image 0 must be"),
        ([np.full((9, 9), "x")], {"box": (1, 1, 3, 3)}, "must hold numbers"),
        ([np.full((9, 9), np.nan)], {"box": (1, 1, 3, 3)}, "NaN"),
        ([np.eye(9), np.full((9, 9), 3.0)], {"box": (1, 1, 3, 3)}, "Image 1 has the same value everywhere"),
        ([np.eye(9)], {"box": (20, 1, 30, 3)}, "outside the 9x9 frame"),
        ([np.eye(9)], {"mask": np.ones((8, 9), bool)}, "mask prompt has shape"),
        ([np.eye(9)], {"mask": np.zeros((9, 9), bool)}, "empty"),
        ([np.eye(9)], {}, "needs points, a box or a mask"),
    ],
)
def test_bad_input_is_refused(model, images, prompt, message):
    with pytest.raises(InputError, match=message):
        medsam2.segment_images(model, images, **prompt)


@pytest.mark.parametrize("template", [-1, 2])
def test_template_outside_the_list_is_refused(model, template):
    with pytest.raises(InputError, match="template index"):
        medsam2.segment_images(model, [np.eye(9), np.eye(9)], template=template, box=(1, 1, 3, 3))
