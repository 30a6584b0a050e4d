"""Overlap and surface-distance metrics between a predicted and a reference mask (2D or 3D).

Conventions:
- Two empty masks agree perfectly: ``dice`` and ``iou`` are 1.0 and ``hd95`` is 0.0.
- When exactly one mask is empty there is no surface to measure to: ``hd95`` is ``inf``.
- ``spacing`` is given in the order of the ARRAY AXES, i.e. ``(z, y, x)`` for a ``[Z, Y, X]`` volume and
  ``(y, x)`` for a ``[Y, X]`` image. SimpleITK's ``GetSpacing()`` is ``(x, y, z)``: reverse it first
  (``medsam2.io.Image.spacing_zyx`` does).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage

from .errors import InputError


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient ``2|A∩B| / (|A| + |B|)`` of two boolean masks; 1.0 when both are empty."""
    a, b = _masks(a, b)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union ``|A∩B| / |A∪B|``; 1.0 when both masks are empty."""
    a, b = _masks(a, b)
    union = int(np.logical_or(a, b).sum())
    return 1.0 if union == 0 else int(np.logical_and(a, b).sum()) / union


def hd95(a: np.ndarray, b: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th percentile of the symmetric surface distances between masks ``a`` and ``b``.

    The distances from every surface voxel of ``a`` to the nearest surface voxel of ``b`` and from every
    surface voxel of ``b`` to ``a`` are pooled, and their 95th percentile is returned (MedPy's convention).
    A surface voxel is a mask voxel with a face neighbour outside the mask (or outside the array).
    Distances are in mm with ``spacing`` (array-axis order: ``(z, y, x)`` for a volume), in voxels without.
    Returns 0.0 when both masks are empty and ``inf`` when only one is.
    """
    a, b = _masks(a, b)
    sampling = _sampling(spacing, a.ndim)
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return float("inf")
    a, b = _crop_to_masks(a, b)
    surface_a, surface_b = _surface(a), _surface(b)
    a_to_b = ndimage.distance_transform_edt(~surface_b, sampling=sampling)[surface_a]
    b_to_a = ndimage.distance_transform_edt(~surface_a, sampling=sampling)[surface_b]
    return float(np.percentile(np.concatenate([a_to_b, b_to_a]), 95))


def per_label_table(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float] | None,
    labels: Iterable[int] | None = None,
) -> list[dict]:
    """One row per label value: ``label, dice, iou, hd95, pred_voxels, ref_voxels, pred_ml, ref_ml``.

    ``pred`` and ``ref`` are label maps of one shape; ``labels`` defaults to every non-zero value found in
    either. ``spacing`` is in array-axis order (mm); without it ``hd95`` is in voxels and the volumes in mL
    are ``None``.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise InputError(f"Prediction {pred.shape} and reference {ref.shape} label maps differ in shape")
    sampling = _sampling(spacing, pred.ndim)
    voxel_ml = None if sampling is None else float(np.prod(sampling)) / 1000.0
    if labels is None:
        labels = sorted(int(v) for v in np.union1d(np.unique(pred), np.unique(ref)) if v != 0)
    rows = []
    for label in labels:
        p, r = pred == label, ref == label
        pred_voxels, ref_voxels = int(p.sum()), int(r.sum())
        rows.append(
            {
                "label": int(label),
                "dice": dice(p, r),
                "iou": iou(p, r),
                "hd95": hd95(p, r, sampling),
                "pred_voxels": pred_voxels,
                "ref_voxels": ref_voxels,
                "pred_ml": None if voxel_ml is None else pred_voxels * voxel_ml,
                "ref_ml": None if voxel_ml is None else ref_voxels * voxel_ml,
            }
        )
    return rows


def _masks(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise InputError(f"Masks differ in shape: {a.shape} and {b.shape}")
    return a, b


def _sampling(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...] | None:
    if spacing is None:
        return None
    sampling = tuple(float(s) for s in spacing)
    if len(sampling) != ndim or not all(s > 0 for s in sampling):
        raise InputError(
            f"Spacing must give {ndim} positive values in array-axis order, got {tuple(spacing)}"
        )
    return sampling


def _crop_to_masks(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to their joint bounding box.

    Every distance stays the same: all surface voxels lie inside the box, and a mask voxel on the box's edge
    is on the surface whether or not the box is the array's edge.
    """
    both = np.logical_or(a, b)
    box = []
    for axis in range(both.ndim):
        hits = np.flatnonzero(both.any(axis=tuple(i for i in range(both.ndim) if i != axis)))
        box.append(slice(hits[0], hits[-1] + 1))
    return a[tuple(box)], b[tuple(box)]


def _surface(mask: np.ndarray) -> np.ndarray:
    faces = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=faces, border_value=0)
