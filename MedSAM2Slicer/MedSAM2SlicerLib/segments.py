"""Reading segments of a segmentation node as ``[K, J, I]`` masks on a volume's grid."""

from __future__ import annotations

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from medsam2.errors import InputError

from .geometry import VolumeGeometry, node_to_world, numpy_to_matrix

_CONVERTER_RULES = (
    "vtkBinaryLabelmapToClosedSurfaceConversionRule",
    "vtkClosedSurfaceToBinaryLabelmapConversionRule",
)


def ensure_converter_rules() -> None:
    """Register Slicer's labelmap <-> closed surface conversion rules where nobody has yet.

    The Slicer application registers them when its Segmentations module starts; a bare MRML scene (the
    ``slicer-core`` wheel) has none, and then segments cannot even be created, because an empty binary
    labelmap is constructed through these rules.
    """
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    registered = {rule.GetClassName() for rule in factory.GetConverterRules()}
    for name in _CONVERTER_RULES:
        if name not in registered:
            factory.RegisterConverterRule(getattr(slicer, name)())


def segment_to_local(segmentation_node, geometry: VolumeGeometry) -> np.ndarray:
    """Matrix from the volume's ``(i, j, k, 1)`` to the segmentation node's own coordinates."""
    return np.linalg.inv(node_to_world(segmentation_node)) @ geometry.ijk_to_world


def oriented_image(mask: np.ndarray, image_to_local: np.ndarray) -> slicer.vtkOrientedImageData:
    """A ``vtkOrientedImageData`` (unsigned char, 0/1) holding a ``[K, J, I]`` mask, placed by the matrix."""
    slices, rows, columns = mask.shape
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(columns, rows, slices)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = mask.astype(np.uint8).ravel()
    image.SetImageToWorldMatrix(numpy_to_matrix(image_to_local))
    return image


def image_voxels(image) -> np.ndarray:
    """The voxels of a ``vtkImageData`` as a ``[K, J, I]`` view (empty when the extent is empty)."""
    x0, x1, y0, y1, z0, z1 = image.GetExtent()
    if x1 < x0 or y1 < y0 or z1 < z0 or image.GetPointData().GetScalars() is None:
        return np.zeros((0, 0, 0), dtype=np.uint8)
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return scalars.reshape(z1 - z0 + 1, y1 - y0 + 1, x1 - x0 + 1)


def get_segment(segmentation_node, segment_id: str):
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise InputError(
            f"Segmentation '{segmentation_node.GetName()}' has no segment with ID '{segment_id}'"
        )
    return segment


def segment_labelmap(segmentation_node, segment_id: str) -> slicer.vtkOrientedImageData:
    """The segment's own binary labelmap (0/1) in the segmentation node's coordinates.

    Segments may share one labelmap layer where each has its own label value; this picks out ``segment_id``.
    """
    ensure_converter_rules()
    label_value = get_segment(segmentation_node, segment_id).GetLabelValue()
    shared = slicer.vtkOrientedImageData()
    if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentation_node, segment_id, shared, False
    ):
        raise InputError(
            f"Segment '{segment_id}' of '{segmentation_node.GetName()}' has no binary labelmap representation"
        )
    binary = slicer.vtkOrientedImageData()
    binary.DeepCopy(shared)
    voxels = image_voxels(binary)
    if voxels.size:
        voxels[:] = voxels == label_value
    return binary


def read_segment_mask(segmentation_node, segment_id: str, geometry: VolumeGeometry) -> np.ndarray:
    """Boolean ``[K, J, I]`` mask of a segment on the volume grid ``geometry`` (nearest-neighbour resampled).

    Both nodes' linear parent transforms are taken into account.
    """
    labelmap = segment_labelmap(segmentation_node, segment_id)
    if image_voxels(labelmap).size == 0:
        return np.zeros(geometry.shape, dtype=bool)
    reference = oriented_image(
        np.zeros(geometry.shape, dtype=np.uint8), segment_to_local(segmentation_node, geometry)
    )
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        labelmap, reference, resampled
    ):
        raise RuntimeError(f"Could not resample segment '{segment_id}' onto the volume grid")
    return _voxels_in_extent(resampled, geometry.shape) > 0


def _voxels_in_extent(image, shape: tuple[int, int, int]) -> np.ndarray:
    """The ``[K, J, I]`` voxels of ``image`` placed on the full extent ``[0, shape)``, zero elsewhere."""
    full = np.zeros(shape, dtype=np.uint8)
    voxels = image_voxels(image)
    if voxels.size == 0:
        return full
    x0, _, y0, _, z0, _ = image.GetExtent()
    source = [slice(None)] * 3
    target = []
    for axis, start in enumerate((z0, y0, x0)):
        lo, hi = max(start, 0), min(start + voxels.shape[axis], shape[axis])
        if hi <= lo:
            return full
        source[axis] = slice(lo - start, hi - start)
        target.append(slice(lo, hi))
    full[tuple(target)] = voxels[tuple(source)]
    return full
