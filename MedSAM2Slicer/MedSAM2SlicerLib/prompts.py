"""Prompts for the engine from Slicer nodes: markups points, an ROI box and a segment drawn on one slice.

Conventions:

- Positions are read in world RAS (parent transforms of the markups included) and mapped onto the volume's
  voxel grid; a prompt lies on the slice nearest to it along the chosen array axis.
- A control point is **negative** when its description is ``"negative"`` (any case) or its label starts with
  ``"-"``; every other point is positive. All points of ``negative_points_node`` are negative.
- The ROI is cut by the slice through its centre; the box covers the voxels whose centres lie inside it:
  ``(x0, y0, x1, y1)`` are the first and last column and row covered.
- ``slice_axis`` is the view the prompt was drawn in; the panel passes it. When it is not given (a script):
  the mask segment's axis if there is one; else, among the axes along which all points fall on one slice,
  the one along which the ROI is thinnest in mm, or else the first of the axial, coronal and sagittal views
  (also between equally thin sides). That guess can be wrong for an ROI drawn in a slice view: Slicer makes
  it as thick as its shortest in-plane side (``vtkMRMLMarkupsROINode::UpdateBoxROIFromControlPoints``,
  ``Libs/MRML/Core``), so a box drawn in the coronal view that is lower than it is wide is as thin along
  the axial axis as along its normal. Pass ``slice_axis`` whenever the view is known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medsam2.errors import InputError
from medsam2.prompts import Prompt

from .geometry import VolumeGeometry, in_plane, matrix_to_numpy, nearest_index, node_to_world, volume_geometry
from .segments import read_segment_mask


@dataclass(frozen=True)
class MaskSegment:
    """A segment used as a mask prompt on one slice: ``index`` along ``axis`` (view name or array axis)."""

    segmentation_node: object
    segment_id: str
    index: int
    axis: int | str | None = None


@dataclass(frozen=True)
class ControlPoint:
    name: str
    kji: np.ndarray
    positive: bool


def is_negative(label: str, description: str) -> bool:
    return description.strip().lower() == "negative" or label.strip().startswith("-")


def control_points(points_node, geometry: VolumeGeometry, all_negative: bool = False) -> list[ControlPoint]:
    """The placed control points of a markups node, in array indices of ``geometry``."""
    points = []
    for n in range(points_node.GetNumberOfControlPoints()):
        if points_node.GetNthControlPointPositionStatus(n) != points_node.PositionDefined:
            continue  # still being placed
        label = points_node.GetNthControlPointLabel(n)
        world = [0.0, 0.0, 0.0]
        points_node.GetNthControlPointPositionWorld(n, world)
        kji = geometry.world_to_kji(world)[0]
        name = f"'{label}' of '{points_node.GetName()}'"
        if np.any(nearest_index(kji) < 0) or np.any(nearest_index(kji) >= geometry.shape):
            raise InputError(
                f"Point {name} at RAS {np.round(world, 2).tolist()} lies outside the volume (array index "
                f"k, j, i = {np.round(kji, 2).tolist()}, shape {geometry.shape})"
            )
        negative = all_negative or is_negative(label, points_node.GetNthControlPointDescription(n))
        points.append(ControlPoint(name, kji, not negative))
    return points


def roi_corners(roi_node, geometry: VolumeGeometry) -> np.ndarray:
    """The 8 corners ``[8, 3]`` of an ROI box in array indices (k, j, i) of ``geometry``."""
    node_to_world(roi_node)  # a warped ROI is no box: refuse it
    bounds = [0.0] * 6
    roi_node.GetObjectBounds(bounds)
    corners = np.array(
        [[x, y, z, 1.0] for x in bounds[0:2] for y in bounds[2:4] for z in bounds[4:6]], dtype=np.float64
    )
    world = (matrix_to_numpy(roi_node.GetObjectToWorldMatrix()) @ corners.T).T[:, :3]
    return geometry.world_to_kji(world)


def choose_axis(geometry: VolumeGeometry, points: list[ControlPoint], corners: np.ndarray | None) -> int:
    """The array axis the prompt was most likely drawn on (see the module notes)."""
    candidates = [axis for axis in range(3) if _slices_of(points, axis).size <= 1]
    if not candidates:
        raise InputError(
            "The points are not on one slice along any axis: "
            + "; ".join(_describe_slices(points, axis, geometry) for axis in range(3))
            + ". Put all points on one slice, or say which with slice_axis."
        )
    views = [geometry.view_axis(view) for view in ("axial", "coronal", "sagittal")]
    if corners is not None:
        extent_mm = (corners.max(axis=0) - corners.min(axis=0)) * np.asarray(geometry.spacing)
        thinnest = min(extent_mm[axis] for axis in candidates)
        candidates = [axis for axis in candidates if extent_mm[axis] <= thinnest * (1 + 1e-6)]
    return min(candidates, key=views.index)


def prompts_from_nodes(
    volume_node,
    points_node=None,
    roi_node=None,
    mask_segment: MaskSegment | tuple | None = None,
    slice_axis: int | str | None = None,
    negative_points_node=None,
    obj_id: int = 1,
) -> list[Prompt]:
    """Engine prompts on ``volume_node``'s grid from markups (RAS) and a segment; one prompt per slice used.

    Points and ROI share one slice: they become one prompt with points and a box. The mask segment may lie on
    another slice and then makes a second prompt.
    """
    geometry = volume_geometry(volume_node)
    if mask_segment is not None and not isinstance(mask_segment, MaskSegment):
        mask_segment = MaskSegment(*mask_segment)
    points = []
    if points_node is not None:
        points += control_points(points_node, geometry)
    if negative_points_node is not None:
        points += control_points(negative_points_node, geometry, all_negative=True)
    corners = roi_corners(roi_node, geometry) if roi_node is not None else None
    if not points and corners is None and mask_segment is None:
        raise InputError("No prompt given: place points, an ROI or choose a segment as mask prompt")

    if slice_axis is not None:
        axis = geometry.resolve_axis(slice_axis)
    elif mask_segment is not None and mask_segment.axis is not None:
        axis = geometry.resolve_axis(mask_segment.axis)
    else:
        axis = choose_axis(geometry, points, corners)

    prompts = []
    if points or corners is not None:
        prompts.append(_point_and_box_prompt(geometry, axis, points, corners, roi_node, obj_id))
    if mask_segment is not None:
        mask_axis = axis if mask_segment.axis is None else geometry.resolve_axis(mask_segment.axis)
        prompts.append(mask_prompt(mask_segment, geometry, mask_axis, obj_id))
    return _merge_same_slice(prompts)


def mask_prompt(mask_segment: MaskSegment, geometry: VolumeGeometry, axis: int, obj_id: int = 1) -> Prompt:
    """The segment's voxels on slice ``mask_segment.index`` along ``axis``, resampled to the volume grid."""
    index = int(mask_segment.index)
    if not 0 <= index < geometry.shape[axis]:
        raise InputError(
            f"Mask slice {index} is outside the volume: array axis {axis} has slices "
            f"0..{geometry.shape[axis] - 1}"
        )
    volume_mask = read_segment_mask(mask_segment.segmentation_node, mask_segment.segment_id, geometry)
    mask = np.take(volume_mask, index, axis=axis)
    if not mask.any():
        raise InputError(
            f"Segment '{mask_segment.segment_id}' is empty on slice {index} along array axis {axis}: "
            "draw it on the slice shown, or pick the slice where it is drawn"
        )
    return Prompt(axis=axis, index=index, obj_id=obj_id, mask=mask)


def _point_and_box_prompt(
    geometry: VolumeGeometry,
    axis: int,
    points: list[ControlPoint],
    corners: np.ndarray | None,
    roi_node,
    obj_id: int,
) -> Prompt:
    slices = _slices_of(points, axis)
    if slices.size > 1:
        raise InputError(
            f"The points must lie on one slice along array axis {axis}, but "
            + _describe_slices(points, axis, geometry)
        )
    index = int(slices[0]) if slices.size else None
    box = None
    if corners is not None:
        centre_slice = int(nearest_index(corners.mean(axis=0)[axis]))
        if index is not None and centre_slice != index:
            raise InputError(
                f"The ROI '{roi_node.GetName()}' is centred on slice {centre_slice} but the points are on "
                f"slice {index} (array axis {axis}); move them onto one slice"
            )
        index = centre_slice
        if not 0 <= index < geometry.shape[axis]:
            raise InputError(f"The centre of ROI '{roi_node.GetName()}' lies outside the volume")
        box = _box_on_slice(geometry, axis, corners, roi_node.GetName())
    prompt_points = labels = None
    if points:
        prompt_points = in_plane(np.stack([p.kji for p in points]), axis)[1]
        labels = [int(p.positive) for p in points]
    return Prompt(axis=axis, index=index, obj_id=obj_id, points=prompt_points, labels=labels, box=box)


def _box_on_slice(geometry: VolumeGeometry, axis: int, corners: np.ndarray, name: str) -> tuple[float, ...]:
    xy = in_plane(corners, axis)[1]
    rows, columns = (geometry.shape[a] for a in range(3) if a != axis)
    # The voxels whose centres (integers) are inside [low, high], clipped to the slice.
    x0, y0 = (max(math.ceil(v - 1e-6), 0) for v in xy.min(axis=0))
    x1, y1 = (
        min(math.floor(v + 1e-6), last)
        for v, last in zip(xy.max(axis=0), (columns - 1, rows - 1), strict=True)
    )
    if x1 <= x0 or y1 <= y0:
        raise InputError(
            f"The ROI '{name}' covers {max(x1 - x0 + 1, 0)} x {max(y1 - y0 + 1, 0)} voxels of the slice; "
            "a box prompt needs at least 2 x 2: make it larger or move it onto the volume"
        )
    return float(x0), float(y0), float(x1), float(y1)


def _slices_of(points: list[ControlPoint], axis: int) -> np.ndarray:
    if not points:
        return np.zeros(0, dtype=np.int64)
    return np.unique(nearest_index([p.kji[axis] for p in points]))


def _describe_slices(points: list[ControlPoint], axis: int, geometry: VolumeGeometry) -> str:
    views = {geometry.view_axis(view): view for view in ("sagittal", "coronal", "axial")}
    where = ", ".join(f"{p.name} on slice {int(nearest_index(p.kji[axis]))}" for p in points)
    return f"along array axis {axis} ({views.get(axis, 'oblique')}): {where}"


def _merge_same_slice(prompts: list[Prompt]) -> list[Prompt]:
    """One prompt per slice: a mask drawn on the slice of the points/box joins their prompt."""
    if len(prompts) == 2 and (prompts[0].axis, prompts[0].index) == (prompts[1].axis, prompts[1].index):
        first, mask = prompts
        return [
            Prompt(
                axis=first.axis,
                index=first.index,
                obj_id=first.obj_id,
                points=first.points,
                labels=first.labels,
                box=first.box,
                mask=mask.mask,
            )
        ]
    return prompts
