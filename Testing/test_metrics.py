"""medsam2.metrics against hand-computed values and a brute-force surface distance."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage

from medsam2 import metrics
from medsam2.errors import InputError


def _brute_force_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """Pairwise distances between surface voxels, a voxel being on the surface when a face neighbour is
    outside the mask or outside the array."""

    def surface_points(mask: np.ndarray) -> np.ndarray:
        padded = np.pad(mask, 1)
        inner = np.ones_like(mask)
        for axis, step in itertools.product(range(mask.ndim), (-1, 1)):
            inner &= np.roll(padded, step, axis=axis)[tuple(slice(1, -1) for _ in range(mask.ndim))]
        return np.argwhere(mask & ~inner) * np.asarray(spacing, dtype=np.float64)

    pa, pb = surface_points(a), surface_points(b)
    distances = np.linalg.norm(pa[:, None, :] - pb[None, :, :], axis=-1)
    return float(np.percentile(np.concatenate([distances.min(axis=1), distances.min(axis=0)]), 95))


def test_dice_and_iou_of_known_overlaps() -> None:
    a = np.zeros((4, 10), bool)
    b = np.zeros((4, 10), bool)
    a[1, 0:6] = True  # 6 voxels
    b[1, 2:10] = True  # 8 voxels, 4 shared
    assert metrics.dice(a, b) == pytest.approx(2 * 4 / 14)
    assert metrics.iou(a, b) == pytest.approx(4 / 10)
    assert metrics.dice(a, a) == 1.0 and metrics.iou(a, a) == 1.0
    assert metrics.dice(a, ~a) == 0.0 and metrics.iou(a, ~a) == 0.0
    empty = np.zeros((4, 10), bool)
    assert metrics.dice(empty, empty) == 1.0 and metrics.iou(empty, empty) == 1.0
    assert metrics.dice(a, empty) == 0.0
    with pytest.raises(InputError, match="differ in shape"):
        metrics.dice(a, a[:3])


@pytest.mark.parametrize(
    ("axis", "shift", "expected_mm"),
    [(0, 2, 2 * 3.0), (1, 3, 3 * 0.8), (2, 3, 3 * 0.5)],
)
def test_hd95_of_offset_cubes_with_anisotropic_spacing(axis: int, shift: int, expected_mm: float) -> None:
    # Every voxel on the cube face opposite to the shift is exactly `shift` voxels from the other cube's
    # surface, the largest distance there is; those faces hold over 5 % of the surface voxels.
    spacing_zyx = (3.0, 0.8, 0.5)
    a = np.zeros((20, 20, 20), bool)
    a[4:12, 4:12, 4:12] = True
    b = np.roll(a, shift, axis=axis)
    assert metrics.hd95(a, b, spacing_zyx) == pytest.approx(expected_mm)
    assert metrics.hd95(a, b) == pytest.approx(shift)
    assert metrics.hd95(b, a, spacing_zyx) == pytest.approx(expected_mm)


def test_hd95_spacing_is_in_array_axis_order() -> None:
    a = np.zeros((20, 20, 20), bool)
    a[4:12, 4:12, 4:12] = True
    b = np.roll(a, 2, axis=0)
    assert metrics.hd95(a, b, (3.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert metrics.hd95(a, b, (1.0, 1.0, 3.0)) == pytest.approx(2.0)


def test_hd95_matches_brute_force_on_random_shapes() -> None:
    rng = np.random.default_rng(3)
    for shape, spacing in [((12, 14, 16), (2.5, 0.9, 0.7)), ((30, 25), (0.6, 1.7))]:
        a = ndimage.binary_opening(rng.random(shape) > 0.45)
        b = ndimage.binary_opening(rng.random(shape) > 0.45)
        a[(0,) * len(shape)] = True  # a voxel on the array border is surface too
        expected = _brute_force_hd95(a, b, spacing)
        assert metrics.hd95(a, b, spacing) == pytest.approx(expected, rel=1e-9)
        assert expected > 0


def test_hd95_counts_the_array_border_as_outside() -> None:
    # a slab filling the array up to its sides: its voxels on the array's sides are surface voxels
    a = np.zeros((8, 6, 6), bool)
    a[0:5] = True
    b = np.zeros((8, 6, 6), bool)
    b[2:4, 2:4, 2:4] = True
    expected = _brute_force_hd95(a, b, (2.0, 1.0, 1.0))
    assert metrics.hd95(a, b, (2.0, 1.0, 1.0)) == pytest.approx(expected)
    # 4.0 if only the slab's face inside the array counted
    assert metrics.hd95(a, b, (2.0, 1.0, 1.0)) == pytest.approx(np.sqrt(21.0))


def test_hd95_of_small_objects_in_a_large_array_uses_the_whole_grid() -> None:
    # the two blobs are far apart: the distance must not be clipped by any cropping
    a = np.zeros((40, 60), bool)
    b = np.zeros((40, 60), bool)
    a[2:5, 2:5] = True
    b[30:33, 50:53] = True
    assert metrics.hd95(a, b, (1.0, 2.0)) == pytest.approx(_brute_force_hd95(a, b, (1.0, 2.0)))


def test_hd95_of_empty_masks() -> None:
    a = np.zeros((5, 5, 5), bool)
    b = a.copy()
    b[2, 2, 2] = True
    assert metrics.hd95(a, a) == 0.0
    assert metrics.hd95(a, b) == float("inf")
    assert metrics.hd95(b, a) == float("inf")
    assert metrics.hd95(b, b, (1.0, 2.0, 3.0)) == 0.0
    with pytest.raises(InputError, match="3 positive values"):
        metrics.hd95(b, b, (1.0, 2.0))


def test_per_label_table() -> None:
    ref = np.zeros((10, 10, 10), np.uint8)
    pred = np.zeros((10, 10, 10), np.uint8)
    ref[1:5, 1:5, 1:5] = 1
    pred[1:5, 1:5, 2:6] = 1  # 48 of 64 voxels shared
    ref[7:9, 7:9, 7:9] = 2  # missed entirely
    pred[0, 9, 9] = 3  # not in the reference
    rows = metrics.per_label_table(pred, ref, spacing=(2.0, 1.0, 0.5))
    assert [r["label"] for r in rows] == [1, 2, 3]
    first = rows[0]
    assert first["dice"] == pytest.approx(2 * 48 / 128)
    assert first["iou"] == pytest.approx(48 / 80)
    assert first["hd95"] == pytest.approx(0.5)
    assert (first["pred_voxels"], first["ref_voxels"]) == (64, 64)
    assert first["ref_ml"] == pytest.approx(64 * 1.0 / 1000)
    assert rows[1]["dice"] == 0.0 and rows[1]["hd95"] == float("inf") and rows[1]["pred_ml"] == 0.0
    assert rows[2]["ref_voxels"] == 0

    only_two = metrics.per_label_table(pred, ref, spacing=None, labels=[2])
    assert len(only_two) == 1 and only_two[0]["label"] == 2 and only_two[0]["ref_ml"] is None
    with pytest.raises(InputError, match="differ in shape"):
        metrics.per_label_table(pred, ref[:5], None)
