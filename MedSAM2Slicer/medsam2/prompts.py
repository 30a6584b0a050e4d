"""Prompts on one slice of a volume: clicks, a box or a mask."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError

AXIS_NAMES = {0: "axial", 1: "coronal", 2: "sagittal"}


@dataclass
class Prompt:
    """A prompt on slice ``index`` along ``axis`` of a ``[Z, Y, X]`` volume.

    The prompted slice is ``volume[index]`` (axis 0, a ``[Y, X]`` image), ``volume[:, index]`` (axis 1,
    ``[Z, X]``) or ``volume[:, :, index]`` (axis 2, ``[Z, Y]``). ``points`` are ``(x, y)`` = (column, row) of
    that image with ``labels`` 1 (positive) or 0 (negative); ``box`` is ``(x0, y0, x1, y1)``; ``mask`` is a
    boolean image of the slice's shape.

    ``absent=True`` (with no points, box or mask) says the object is not on this slice, as a radiologist says
    by erasing it there: tracking does not carry the object across the slice, so the object keeps only the
    slices it can reach from its other prompts without crossing one (:mod:`medsam2.absent`).
    """

    axis: int
    index: int
    obj_id: int = 1
    points: Sequence[Sequence[float]] | None = None
    labels: Sequence[int] | None = None
    box: Sequence[float] | None = None
    mask: np.ndarray | None = field(default=None, repr=False)
    absent: bool = False

    def __post_init__(self) -> None:
        if self.axis not in AXIS_NAMES:
            raise InputError(f"Prompt axis must be 0 (axial), 1 (coronal) or 2 (sagittal), got {self.axis!r}")
        if int(self.obj_id) < 1:
            raise InputError(f"Prompt obj_id must be a positive integer, got {self.obj_id!r}")
        given = self.points is not None or self.box is not None or self.mask is not None
        if self.absent and given:
            raise InputError(
                "An absent prompt says the object is not on the slice: it takes no points, box or mask"
            )
        if not self.absent and not given:
            raise InputError("A prompt needs points, a box or a mask")
        if self.points is not None:
            pts = np.asarray(self.points, dtype=np.float64)
            if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) == 0:
                raise InputError(f"Prompt points must be a list of (x, y) pairs, got shape {pts.shape}")
            labels = [1] * len(pts) if self.labels is None else list(self.labels)
            if len(labels) != len(pts) or any(v not in (0, 1) for v in labels):
                raise InputError("Prompt labels must give 1 (positive) or 0 (negative) for each point")
            self.points, self.labels = pts, np.asarray(labels, dtype=np.int64)
        elif self.labels is not None:
            raise InputError("Prompt labels were given without points")
        if self.box is not None:
            box = np.asarray(self.box, dtype=np.float64).reshape(-1)
            if box.shape != (4,) or not np.all(np.isfinite(box)):
                raise InputError(f"Prompt box must be (x0, y0, x1, y1), got {self.box!r}")
            x0, y0, x1, y1 = box
            if x1 <= x0 or y1 <= y0:
                raise InputError(f"Prompt box {_numbers(box)} is empty: it needs x1 > x0 and y1 > y0")
            self.box = box
        if self.mask is not None:
            mask = np.asarray(self.mask)
            if mask.ndim != 2:
                raise InputError(f"Prompt mask must be a 2D image, got shape {mask.shape}")
            if not mask.any():
                raise InputError("Prompt mask is empty")
            self.mask = mask.astype(bool)

    @property
    def axis_name(self) -> str:
        return AXIS_NAMES[self.axis]

    def check_fits(self, volume_shape: Sequence[int]) -> None:
        """Raise ``InputError`` unless the prompt lies inside a volume of shape ``[Z, Y, X]``."""
        depth = volume_shape[self.axis]
        if not 0 <= self.index < depth:
            raise InputError(
                f"Prompt slice {self.index} is outside the volume: the {self.axis_name} axis has slices "
                f"0..{depth - 1}"
            )
        rows, cols = [n for a, n in enumerate(volume_shape) if a != self.axis]
        where = f"the {self.axis_name} slice ({cols} columns x {rows} rows)"
        if self.points is not None:
            pts = np.asarray(self.points)
            if (
                np.any(pts[:, 0] < 0)
                or np.any(pts[:, 0] > cols - 1)
                or np.any(pts[:, 1] < 0)
                or np.any(pts[:, 1] > rows - 1)
            ):
                raise InputError(f"A prompt point lies outside {where}: {pts.tolist()}")
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            if x1 < 0 or y1 < 0 or x0 > cols - 1 or y0 > rows - 1:
                raise InputError(f"The prompt box {_numbers(self.box)} lies outside {where}")
        if self.mask is not None and self.mask.shape != (rows, cols):
            raise InputError(
                f"The prompt mask has shape {self.mask.shape}, but {where} needs shape ({rows}, {cols})"
            )


def _numbers(values: Sequence[float]) -> str:
    """``(x0, y0, x1, y1)`` as a reader would type it (numpy 2 shows ``np.float64(3.0)`` in a tuple)."""
    return "(" + ", ".join(f"{float(v):g}" for v in values) + ")"
