"""A RECIST measurement turned into a box prompt.

A radiology report's RECIST measurement is the lesion's longest diameter, drawn as a line on one slice.
bowang-lab's MedSAM2 (``get_diameter_bbox`` in their CT-lesion inference script, FLARE25 RECIST-to-3D) turns
it into a box prompt on that slice: a square, aligned with the image axes, centred on the line's midpoint,
whose side is the line's length (so it holds a round lesion of that diameter), clamped to the image. They
work in whole pixels of their resampled slices; here the square is square in millimetres (the same thing on
square pixels) and keeps fractions of a pixel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InputError


def recist_box(
    first: Sequence[float],
    second: Sequence[float],
    spacing: Sequence[float] = (1.0, 1.0),
    size: Sequence[int] | None = None,
) -> tuple[float, float, float, float]:
    """The box ``(x0, y0, x1, y1)`` of the RECIST line from ``first`` to ``second`` (``(x, y)`` = column, row
    of the slice).

    ``spacing`` is the ``(column, row)`` pixel size in mm; ``size`` the slice's ``(columns, rows)``, to clamp
    the box to the slice as bowang-lab does. The side is the line's length in mm; the half side in pixels is
    that length's half divided by each direction's pixel size.
    """
    a, b = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    step = np.asarray(spacing, dtype=np.float64)
    if a.shape != (2,) or b.shape != (2,) or step.shape != (2,) or np.any(step <= 0):
        raise InputError("A RECIST line needs two (x, y) endpoints and a positive (column, row) spacing")
    length = float(np.linalg.norm((b - a) * step))
    if length == 0:
        raise InputError(
            f"The RECIST line from {tuple(a)} to {tuple(b)} has no length: its endpoints coincide"
        )
    centre = (a + b) / 2
    half = length / 2 / step
    low, high = centre - half, centre + half
    if size is not None:
        last = np.asarray(size, dtype=np.float64) - 1
        low, high = np.clip(low, 0, last), np.clip(high, 0, last)
    return float(low[0]), float(low[1]), float(high[0]), float(high[1])
