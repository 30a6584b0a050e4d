"""Writing a ``[K, J, I]`` result into one segment, as one step of the segmentation's undo history."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import slicer

from medsam2.errors import InputError

from .geometry import VolumeGeometry, numpy_to_matrix
from .scene_nodes import unused_segment_name
from .segments import ensure_converter_rules, image_voxels, oriented_image, segment_labelmap, segment_to_local

_REFERENCE_GEOMETRY = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
_BINARY_LABELMAP = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()


@dataclass
class SegmentSnapshot:
    """How one segment looked before a write: enough to put it back if the write fails half-way."""

    segmentation_node: object
    segment_id: str
    existed: bool
    labelmap: slicer.vtkOrientedImageData | None = None  # 0/1, segmentation node coordinates

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
    """Writes masks into segments of segmentation nodes, each write one step of ``history``.

    ``history`` is an :class:`~MedSAM2SlicerLib.history.EditorUndo` or :class:`~MedSAM2SlicerLib.history.OwnUndo`.
    Only the target segment changes: other segments keep their voxels (Slicer moves an overlapping segment
    out of a shared labelmap layer rather than cutting it).
    """

    def __init__(self, history) -> None:
        self.history = history

    def write(
        self,
        segmentation_node,
        mask: np.ndarray,
        geometry: VolumeGeometry,
        segment_id: str | None = None,
        segment_name: str | None = None,
        volume_node=None,
    ) -> str:
        """Put ``mask`` (``[K, J, I]`` on ``geometry``'s grid) into a segment; returns the segment's ID.

        A new segment is made when ``segment_id`` is None or names no segment yet. The segmentation's
        reference geometry is taken from the volume when it has none. A state is saved in the history first,
        so one undo takes the write back (a new segment is removed). If anything fails the segment is
        restored at once. ``volume_node`` becomes the Segment Editor's source volume if it has none.
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
        self.history.save_state(segmentation_node, volume_node)
        try:
            if not reference_geometry:
                segmentation.SetConversionParameter(
                    _REFERENCE_GEOMETRY, _serialized_grid(segmentation_node, geometry)
                )
            if snapshot is None or not snapshot.existed:
                segment_id = segmentation.AddEmptySegment(
                    segment_id or "", segment_name or unused_segment_name(segmentation)
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
        return segment_id

    def can_undo(self, segmentation_node) -> bool:
        return segmentation_node is not None and self.history.can_undo(segmentation_node)

    def undo(self, segmentation_node) -> bool:
        """Take back the latest step of the segmentation's history; False when there is nothing to undo."""
        return segmentation_node is not None and self.history.undo(segmentation_node)


def _replace_labelmap(segmentation_node, segment_id: str, labelmap) -> None:
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if labelmap is None or not image_voxels(labelmap).any():
        ok = logic.ClearSegment(segmentation_node, segment_id)
    else:
        ok = logic.SetBinaryLabelmapToSegment(labelmap, segmentation_node, segment_id, logic.MODE_REPLACE)
    if not ok:
        raise RuntimeError(f"Could not write segment '{segment_id}' of '{segmentation_node.GetName()}'")


def _serialized_grid(segmentation_node, geometry: VolumeGeometry) -> str:
    """The volume grid in the segmentation's coordinates, as Slicer stores a reference geometry."""
    slices, rows, columns = geometry.shape
    return slicer.vtkSegmentationConverter.SerializeImageGeometry(
        numpy_to_matrix(segment_to_local(segmentation_node, geometry)),
        [0, columns - 1, 0, rows - 1, 0, slices - 1],
    )
