"""From the module panel's parameters to library calls: prompts, the slice a view shows, engine options.

``p`` is the module's parameter node (any object with its fields: ``inputVolume``, ``segmentation``,
``segmentID``, ``positivePoints``, ``negativePoints``, ``box``, ``promptViewNodeID``, ``maskSegmentID``,
``maskAxis``, ``maskSlice``, ``orientations``, ``aggregation``, ``memoryPolicy``, ``confidenceThreshold``,
``windowSource``, ``windowLevel``, ``windowWidth``).
The slice view a prompt was placed in decides its axis when the markups alone leave it open (one point lies
on a slice along every axis).
"""

from __future__ import annotations

from medsam2.errors import InputError
from medsam2.memory import MemoryOptions
from medsam2.prompts import Prompt

from .geometry import matrix_to_numpy, nearest_index, volume_geometry
from .prompts import MaskSegment, mask_prompt, prompts_from_nodes
from .window import describe, window_options


def slice_of(volume_node, slice_node) -> tuple[int, int]:
    """``(array axis, slice index)`` of ``volume_node`` that ``slice_node`` shows (its plane through its origin)."""
    geometry = volume_geometry(volume_node)
    slice_to_ras = matrix_to_numpy(slice_node.GetSliceToRAS())
    axis = geometry.closest_axis(slice_to_ras[:3, 2])
    return axis, int(nearest_index(geometry.world_to_kji(slice_to_ras[:3, 3])[0, axis]))


def set_mask_prompt(p, slice_node) -> None:
    """Use the selected segment, as drawn on the slice ``slice_node`` shows, as the mask prompt.

    Checked at once: the segment must have voxels on that slice.
    """
    if not (p.inputVolume and p.segmentation and p.segmentID):
        raise InputError("Select the input volume and the segment drawn on the slice first")
    if slice_node is None:
        raise InputError("Move the mouse over a slice view first")
    axis, index = slice_of(p.inputVolume, slice_node)
    mask_prompt(MaskSegment(p.segmentation, p.segmentID, index, axis), volume_geometry(p.inputVolume), axis)
    p.maskSegmentID, p.maskAxis, p.maskSlice = p.segmentID, axis, index


def mask_description(p) -> str:
    segment = None
    if p.maskSlice >= 0 and p.segmentation is not None:
        segment = p.segmentation.GetSegmentation().GetSegment(p.maskSegmentID)
    if segment is None:
        return "none"
    return f"'{segment.GetName()}' on slice {p.maskSlice} of array axis {p.maskAxis}"


def panel_prompts(p) -> list[Prompt]:
    """The engine prompts of the panel's markups (RAS -> array indices) and mask segment."""
    if not p.inputVolume:
        raise InputError("Select an input volume")

    def placed(node):
        return node if node is not None and node.GetNumberOfDefinedControlPoints() else None

    mask = None
    if p.maskSlice >= 0 and p.segmentation is not None and p.maskSegmentID:
        mask = MaskSegment(p.segmentation, p.maskSegmentID, p.maskSlice, p.maskAxis)
    scene = p.inputVolume.GetScene()
    view = scene.GetNodeByID(p.promptViewNodeID) if p.promptViewNodeID else None
    return prompts_from_nodes(
        p.inputVolume,
        placed(p.positivePoints),
        placed(p.box),
        mask,
        slice_of(p.inputVolume, view)[0] if view is not None else None,
        negative_points_node=placed(p.negativePoints),
    )


def engine_options(p) -> dict:
    """Keyword arguments of ``medsam2.segment_volume`` from the panel's options, the intensity window
    included (:mod:`MedSAM2SlicerLib.window`): plain values, so they can be sent to an engine server."""
    if not p.inputVolume:
        raise InputError("Select an input volume")
    memory = MemoryOptions(policy=p.memoryPolicy, confidence_threshold=p.confidenceThreshold)
    return {
        "orientations": p.orientations,
        "aggregate": p.aggregation,
        "memory": memory,
        **window_options(p.inputVolume, p.windowSource, p.windowLevel, p.windowWidth),
    }


def window_description(p) -> str:
    """What the model will see of the input volume, for the panel."""
    if not p.inputVolume:
        return "no input volume"
    return describe(window_options(p.inputVolume, p.windowSource, p.windowLevel, p.windowWidth))
