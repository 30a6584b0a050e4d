"""Writing a ``[K, J, I]`` result into one segment, with a way back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import slicer

from medsam2.errors import InputError

from .geometry import VolumeGeometry, numpy_to_matrix
from .segments import ensure_converter_rules, image_voxels, oriented_image, segment_labelmap, segment_to_local

_REFERENCE_GEOMETRY = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
_BINARY_LABELMAP = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()


@dataclass
class SegmentSnapshot:
    """How one segment looked before a write: enough to put it back."""

    segmentation_node: object
    segment_id: str
    existed: bool
    labelmap: slicer.vtkOrientedImageData | None = None  # 0/1, segmentation node coordinates
    on_undo: Callable[[], None] | None = None

    @classmethod
    def take(cls, segmentation_node, segment_id: str) -> SegmentSnapshot:
        if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
            return cls(segmentation_node, segment_id, existed=False)
        return cls(segmentation_node, segment_id, True, segment_labelmap(segmentation_node, segment_id))

    def restore(self) -> None:
        segmentation = self.segmentation_node.GetSegmentation()
        if not self.existed:
            if segmentation.GetSegment(self.segment_id) is not None:
                segmentation.RemoveSegment(self.segment_id)
            return
        if segmentation.GetSegment(self.segment_id) is None:
            raise InputError(
                f"Segment '{self.segment_id}' was deleted, so its earlier state cannot be restored"
            )
        _replace_labelmap(self.segmentation_node, self.segment_id, self.labelmap)


class SegmentWriter:
    """Writes masks into segments of segmentation nodes and keeps the previous states for ``undo()``.

    Only the target segment changes: other segments keep their voxels (Slicer moves an overlapping segment
    out of a shared labelmap layer rather than cutting it). When the scene has MRML undo switched on, a scene
    undo state is saved as well, so Slicer's Edit > Undo also takes the write back.
    """

    def __init__(self, undo_levels: int = 10) -> None:
        self.undo_levels = undo_levels
        self._history: list[SegmentSnapshot] = []

    @property
    def can_undo(self) -> bool:
        return bool(self._history)

    def write(
        self,
        segmentation_node,
        mask: np.ndarray,
        geometry: VolumeGeometry,
        segment_id: str | None = None,
        segment_name: str | None = None,
        on_undo: Callable[[], None] | None = None,
    ) -> str:
        """Put ``mask`` (``[K, J, I]`` on ``geometry``'s grid) into a segment; returns the segment's ID.

        A new segment is made when ``segment_id`` is None or names no segment yet. The segmentation's
        reference geometry is taken from the volume when it has none. If anything fails the segment is
        restored to what it was. ``on_undo`` is called when ``undo()`` takes this write back.
        """
        mask = np.asarray(mask)
        if mask.shape != geometry.shape:
            raise InputError(f"The mask has shape {mask.shape}, the volume grid is {geometry.shape}")
        ensure_converter_rules()
        segmentation = segmentation_node.GetSegmentation()
        source = segmentation.GetSourceRepresentationName()
        if source != _BINARY_LABELMAP:
            raise InputError(
                f"Segmentation '{segmentation_node.GetName()}' is stored as '{source}'; MedSAM2 writes "
                f"voxels, so set its source representation to '{_BINARY_LABELMAP}' first"
            )
        reference_geometry = segmentation.GetConversionParameter(_REFERENCE_GEOMETRY)
        snapshot = SegmentSnapshot.take(segmentation_node, segment_id) if segment_id else None
        scene = segmentation_node.GetScene()
        if scene is not None and scene.GetUndoFlag():
            scene.SaveStateForUndo()
        try:
            if not reference_geometry:
                segmentation.SetConversionParameter(
                    _REFERENCE_GEOMETRY, _serialized_grid(segmentation_node, geometry)
                )
            if snapshot is None or not snapshot.existed:
                segment_id = segmentation.AddEmptySegment(
                    segment_id or "", segment_name or _new_name(segmentation)
                )
                if not segment_id:
                    raise RuntimeError(f"Could not add a segment to '{segmentation_node.GetName()}'")
                snapshot = SegmentSnapshot(segmentation_node, segment_id, existed=False)
            labelmap = oriented_image(mask > 0, segment_to_local(segmentation_node, geometry))
            _replace_labelmap(segmentation_node, segment_id, labelmap)
        except BaseException:
            try:
                if snapshot is not None:
                    snapshot.restore()
            finally:
                segmentation.SetConversionParameter(_REFERENCE_GEOMETRY, reference_geometry)
            raise
        snapshot.on_undo = on_undo
        self._history.append(snapshot)
        del self._history[: -self.undo_levels]
        return segment_id

    def undo(self) -> bool:
        """Restore the segment changed by the latest write; False when there is nothing to undo."""
        if not self._history:
            return False
        snapshot = self._history.pop()
        snapshot.restore()
        if snapshot.on_undo is not None:
            snapshot.on_undo()
        return True


def _replace_labelmap(segmentation_node, segment_id: str, labelmap) -> None:
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if labelmap is None or not image_voxels(labelmap).any():
        ok = logic.ClearSegment(segmentation_node, segment_id)
    else:
        ok = logic.SetBinaryLabelmapToSegment(labelmap, segmentation_node, segment_id, logic.MODE_REPLACE)
    if not ok:
        raise RuntimeError(f"Could not write segment '{segment_id}' of '{segmentation_node.GetName()}'")


def _new_name(segmentation) -> str:
    names = {segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())}
    name, n = "MedSAM2", 1
    while name in names:
        n += 1
        name = f"MedSAM2 {n}"
    return name


def _serialized_grid(segmentation_node, geometry: VolumeGeometry) -> str:
    """The volume grid in the segmentation's coordinates, as Slicer stores a reference geometry."""
    slices, rows, columns = geometry.shape
    return slicer.vtkSegmentationConverter.SerializeImageGeometry(
        numpy_to_matrix(segment_to_local(segmentation_node, geometry)),
        [0, columns - 1, 0, rows - 1, 0, slices - 1],
    )
