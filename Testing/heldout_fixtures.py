"""What the held-out evaluation's tests share: the generated volume's shape and a box-shaped reference on it.
Their ``model`` and ``volume`` fixtures are in conftest.py."""

from __future__ import annotations

import numpy as np

Z, Y, X = 8, 24, 32


def box_reference() -> np.ndarray:
    """A box-shaped structure on slices 1..6 of a ``[Z, Y, X]`` volume."""
    reference = np.zeros((Z, Y, X), bool)
    reference[1:7, 6:18, 8:24] = True
    return reference
