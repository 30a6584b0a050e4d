"""The pieces of a tracked mask, each prompted with a box of its own.

A box-prompted decoder (LiteMedSAM) segments what one box frames. A tracked object can show as several pieces
on a slice: below the arch, the aorta is the ascending and the descending aorta; a stomach can be its fundus
and its antrum. One box around all the pieces frames what lies between them (the heart, the mediastinum);
the decoder segments that, and the chain of boxes grows from there (BENCHMARKS 4h: the chest CT's aorta after
a correction drawn on a slice that shows both). So a box-tracking model prompts the next frame with one box
per piece that holds at least :data:`MIN_PIECE_SHARE` of the mask and unites the masks decoded from them
(``SAM2Model.tracking_prompts``).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

# The least share of an object's mask that a piece needs for a box of its own; smaller ones (specks at the
# mask's edge) are left to the decoder.
MIN_PIECE_SHARE = 0.1
_EIGHT_CONNECTED = np.ones((3, 3), bool)


def piece_boxes(mask: torch.Tensor) -> list[list[tuple[int, int, int, int]]]:
    """Per object of ``mask`` ``[B, H, W]`` (bool), the boxes ``(x0, y0, x1, y1)`` (pixels, ends exclusive) of
    its 8-connected pieces holding at least :data:`MIN_PIECE_SHARE` of its pixels, the largest first; ``[]``
    for an empty mask."""
    out = []
    for m in mask.cpu().numpy():
        labels, count = ndimage.label(m, structure=_EIGHT_CONNECTED)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        extents = ndimage.find_objects(labels)
        largest_first = np.argsort(-sizes, kind="stable")
        least = MIN_PIECE_SHARE * sizes.sum()
        out.append(
            [
                (extents[i][1].start, extents[i][0].start, extents[i][1].stop, extents[i][0].stop)
                for i in largest_first
                if sizes[i] >= least
            ]
        )
    return out
