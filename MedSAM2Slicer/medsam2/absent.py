"""Slices where an object is absent: what a radiologist says by erasing it there.

A prompt with ``absent=True`` on slice ``k`` of an axis bounds its object along that axis: tracking from the
object's other prompts does not carry it across slice ``k``, so the object may only be on the runs of slices
between its absent slices that one of its prompts reaches (:func:`allowed_slices`). ``segment_volume`` ends a
direction once every object has passed the last slice it may be on, and sets the object to background on the
slices it may not be on, on every pass (:func:`apply_bounds`); the upstream pipeline, which tracks as
bowang-lab's code does, gets its result bounded only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import InputError
from .prompts import AXIS_NAMES, Prompt

# Per object and axis: the slices of that axis the object may be on, ``[depth]`` bool.
Bounds = dict[int, dict[int, np.ndarray]]


def footprint(prompt: Prompt, axis: int) -> set[int]:
    """The slices along ``axis`` that ``prompt`` puts the object on: its own slice on its axis; on another
    axis, the rows or columns of its image that its positive points, box or mask cover."""
    if prompt.absent:
        return set()
    if prompt.axis == axis:
        return {int(prompt.index)}
    # A slice image's rows run along the first of the two other axes, its columns along the second.
    along_rows = axis == min(a for a in AXIS_NAMES if a != prompt.axis)
    out: set[int] = set()
    if prompt.points is not None:
        positive = np.asarray(prompt.points)[np.asarray(prompt.labels) == 1]
        out.update(int(round(v)) for v in positive[:, 1 if along_rows else 0])
    if prompt.box is not None:
        low, high = (prompt.box[1], prompt.box[3]) if along_rows else (prompt.box[0], prompt.box[2])
        out.update(range(int(np.floor(low)), int(np.ceil(high))))
    if prompt.mask is not None:
        out.update(np.flatnonzero(prompt.mask.any(axis=1 if along_rows else 0)).tolist())
    return out


def allowed_slices(prompts: Sequence[Prompt], obj_id: int, axis: int, depth: int) -> np.ndarray | None:
    """Where along ``axis`` (``depth`` slices) object ``obj_id`` may be, as a ``[depth]`` bool array: every
    run of slices between its absent slices on that axis that holds one of its prompts' footprints
    (:func:`footprint`). ``None`` when it has no absent slice on that axis."""
    absent = {p.index for p in prompts if p.obj_id == obj_id and p.absent and p.axis == axis}
    if not absent:
        return None
    reached = set().union(*(footprint(p, axis) for p in prompts if p.obj_id == obj_id))
    allowed = np.zeros(depth, bool)
    run_start = 0
    for stop in sorted(absent) + [depth]:
        if any(run_start <= i < stop for i in reached):
            allowed[run_start:stop] = True
        run_start = stop + 1
    return allowed


def check_absent(prompts: Sequence[Prompt]) -> None:
    """Raise ``InputError`` when an object has absent prompts only, or a slice both prompted and absent."""
    for obj_id in sorted({p.obj_id for p in prompts}):
        own = [p for p in prompts if p.obj_id == obj_id]
        absent = {(p.axis, p.index) for p in own if p.absent}
        if len(absent) == len(own):
            raise InputError(
                f"Object {obj_id} has only slices marked absent: it needs a click, box or mask somewhere"
            )
        both = sorted(absent & {(p.axis, p.index) for p in own if not p.absent})
        if both:
            axis, index = both[0]
            raise InputError(
                f"Object {obj_id} is both prompted and marked absent on {AXIS_NAMES[axis]} slice {index}"
            )


def bounds(prompts: Sequence[Prompt], shape: Sequence[int]) -> Bounds:
    """:func:`allowed_slices` for every object and axis with absent prompts in a ``shape`` ``[Z, Y, X]`` volume."""
    out: Bounds = {}
    for obj_id, axis in sorted({(p.obj_id, p.axis) for p in prompts if p.absent}):
        out.setdefault(obj_id, {})[axis] = allowed_slices(prompts, obj_id, axis, shape[axis])
    return out


def apply_bounds(probabilities: dict[int, np.ndarray], bounds: Bounds) -> None:
    """Set each object's ``[Z, Y, X]`` probabilities to 0 on the slices it may not be on (in place)."""
    for obj_id, axes in bounds.items():
        if obj_id in probabilities:
            for axis, allowed in axes.items():
                np.moveaxis(probabilities[obj_id], axis, 0)[~allowed] = 0.0
