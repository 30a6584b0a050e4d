"""A row's prompt, as the table gives it, turned into engine prompts on the row's image.

Boxes, points and masks go through the command line's own parsing (``cli_inputs.volume_prompts``), so a table
cell means what the same text means after ``--box``, ``--point`` or ``--mask`` of ``medsam2 segment``. A RECIST
line's endpoints are parsed as two points (so they are checked to lie in the image, in voxels or in mm) and
then become a box (``recist.recist_box``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .. import io
from ..cli_inputs import AXES, PromptArgs, parse_numbers, volume_prompts
from ..errors import InputError
from ..prompts import Prompt
from .recist import recist_box
from .rows import PromptSpec


def engine_prompts(spec: PromptSpec, image: io.Image, obj_id: int) -> list[Prompt]:
    """The prompts of object ``obj_id`` on ``image``; ``InputError`` for a prompt that does not fit it."""
    args = PromptArgs(
        points=list(spec.points),
        box=spec.box,
        mask=spec.mask,
        mask_label=spec.mask_label,
        slice_index=spec.slice_index,
        axis=spec.axis,
        world=spec.world,
        obj_id=obj_id,
    )
    if spec.recist is None:
        return volume_prompts(args, image)
    return [_recist_prompt(spec, args, image)]


def _recist_prompt(spec: PromptSpec, args: PromptArgs, image: io.Image) -> Prompt:
    count = 3 if spec.world else 2
    values = parse_numbers(spec.recist, (2 * count,), "recist (two endpoints)")
    ends = [",".join(f"{v!r}" for v in values[:count]), ",".join(f"{v!r}" for v in values[count:])]
    args.points = ends
    on_slices = volume_prompts(args, image)
    if len(on_slices) != 1:
        found = ", ".join(str(p.index) for p in on_slices)
        raise InputError(f"The RECIST endpoints {spec.recist} lie on different {spec.axis} slices ({found})")
    (line,) = on_slices
    axis = AXES[spec.axis]
    box = recist_box(line.points[0], line.points[1], _pixel_spacing(image, axis), _slice_size(image, axis))
    return Prompt(axis=axis, index=line.index, obj_id=line.obj_id, box=box)


def _pixel_spacing(image: io.Image, axis: int) -> tuple[float, float]:
    """The ``(column, row)`` pixel size in mm of the slices along array ``axis``."""
    rows, columns = (a for a in range(3) if a != axis)
    return image.spacing_zyx[columns], image.spacing_zyx[rows]


def _slice_size(image: io.Image, axis: int) -> tuple[int, int]:
    rows, columns = (n for a, n in enumerate(image.array.shape) if a != axis)
    return columns, rows


def describe(prompts: Sequence[Prompt]) -> list[dict]:
    """The prompts as plain data for the results: axis, slice, and the box, points or mask size."""
    described = []
    for p in prompts:
        entry: dict = {"axis": p.axis_name, "slice": int(p.index)}
        if p.box is not None:
            entry["box"] = [round(float(v), 3) for v in p.box]
        if p.points is not None:
            entry["points"] = [[round(float(x), 3), round(float(y), 3)] for x, y in np.asarray(p.points)]
            entry["labels"] = [int(v) for v in p.labels]
        if p.mask is not None:
            entry["mask_pixels"] = int(p.mask.sum())
        described.append(entry)
    return described
