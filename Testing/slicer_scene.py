"""A MRML scene from the slicer-core wheel with slicerio's CTChest4, and helpers that read it with Slicer's own
API (independent of the code under test), for the tests of MedSAM2SlicerLib.

The oracle engine paints each prompt at its own slice (box, mask, positive points), so the segment written
back must cover exactly the voxels under the prompt: any error in geometry, axis choice or writing shows.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import slicer
import slicerio
import vtk
from vtk.util import numpy_support

from medsam2.errors import Cancelled
from MedSAM2SlicerLib import SegmentationLogic

DATA = Path(slicerio.__file__).parent / "data"
SEGMENT_LOGIC = slicer.vtkSlicerSegmentationsModuleLogic
REFERENCE_GEOMETRY = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()


def vtk_matrix(array):
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r][c]))
    return matrix


def numpy_matrix(matrix):
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def load_ct(scene):
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CTChest4")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(DATA / "CTChest4.nrrd"))
    assert storage.ReadData(volume)
    return volume


def load_segmentation(scene):
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(DATA / "Segmentation.seg.nrrd"))
    assert storage.ReadData(segmentation)
    return segmentation


def make_volume(scene, voxels, ijk_to_ras, name="volume"):
    image = vtk.vtkImageData()
    image.SetDimensions(voxels.shape[2], voxels.shape[1], voxels.shape[0])
    image.GetPointData().SetScalars(
        numpy_support.numpy_to_vtk(np.ascontiguousarray(voxels).ravel(), deep=True)
    )
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    volume.SetAndObserveImageData(image)
    volume.SetIJKToRASMatrix(vtk_matrix(ijk_to_ras))
    return volume


def add_transform(scene, matrix, node):
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(vtk_matrix(matrix))
    node.SetAndObserveTransformNodeID(transform.GetID())
    return transform


def world_of(volume, i, j, k):
    """World RAS of voxel (i, j, k) through MRML's own matrices and transforms."""
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk_to_ras)
    ras = ijk_to_ras.MultiplyPoint((i, j, k, 1.0))[:3]
    to_world = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(volume.GetParentTransformNode(), None, to_world)
    return np.array(to_world.TransformPoint(ras))


def add_points(scene, volume, ijk_points, labels=None, name="points"):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    for n, ijk in enumerate(ijk_points):
        node.AddControlPoint(vtk.vtkVector3d(*world_of(volume, *ijk)), labels[n] if labels else f"P-{n + 1}")
    return node


def node_to_world(node):
    matrix = vtk.vtkMatrix4x4()
    if node.GetParentTransformNode():
        node.GetParentTransformNode().GetMatrixTransformToWorld(matrix)
    return numpy_matrix(matrix)


def world_grid(volume):
    """The volume's IJK-to-world matrix, from MRML's own matrices."""
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk_to_ras)
    return node_to_world(volume) @ numpy_matrix(ijk_to_ras)


def segment_on_grid(segmentation, segment_id, volume):
    """A segment as a [K, J, I] mask, read with Slicer's own API; checks it lies on the volume's world grid."""
    image = slicer.vtkOrientedImageData()
    assert SEGMENT_LOGIC.GetSegmentBinaryLabelmapRepresentation(segmentation, segment_id, image, True)
    full = np.zeros(volume.GetImageData().GetDimensions()[::-1], dtype=bool)
    x0, x1, y0, y1, z0, z1 = image.GetExtent()
    if x1 >= x0:
        matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        np.testing.assert_allclose(numpy_matrix(matrix), world_grid(volume), atol=1e-6)
        voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
        label = segmentation.GetSegmentation().GetSegment(segment_id).GetLabelValue()
        full[z0 : z1 + 1, y0 : y1 + 1, x0 : x1 + 1] = (
            voxels.reshape(z1 - z0 + 1, y1 - y0 + 1, x1 - x0 + 1) == label
        )
    return full


def replace_segment(segmentation, segment_id, volume, mask):
    """Set a segment to the ``[K, J, I]`` ``mask`` with Slicer's own API, as the Segment Editor's effects do."""
    dims = volume.GetImageData().GetDimensions()
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(*dims)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = mask.ravel()
    image.SetImageToWorldMatrix(vtk_matrix(world_grid(volume)))
    assert SEGMENT_LOGIC.SetBinaryLabelmapToSegment(
        image, segmentation, segment_id, SEGMENT_LOGIC.MODE_REPLACE
    )


def all_segments(segmentation, volume):
    seg = segmentation.GetSegmentation()
    ids = [seg.GetNthSegmentID(n) for n in range(seg.GetNumberOfSegments())]
    return {sid: segment_on_grid(segmentation, sid, volume) for sid in ids}


def assert_same_segments(before, after):
    assert before.keys() == after.keys()
    for sid in before:
        assert before[sid].sum() == after[sid].sum() and np.array_equal(before[sid], after[sid]), sid


class OracleEngine:
    """Engine stand-in: paints every prompt's box, mask and positive points at its slice (inclusive box)."""

    def __init__(self, cancel_after=None, scribble=False):
        self.calls = []
        self.cancel_after = cancel_after
        self.scribble = scribble

    def __call__(self, model, volume, prompts, spacing=None, progress=None, cancel=None, **options):
        self.calls.append(
            SimpleNamespace(model=model, prompts=list(prompts), spacing=spacing, options=options)
        )
        labels = np.zeros(volume.shape, dtype=np.uint8)
        for n, prompt in enumerate(prompts):
            if progress is not None:
                progress(n + 1, len(prompts), f"prompt {n + 1}")
            if self.cancel_after == n:
                cancel.wait(5)
            if cancel is not None and cancel.is_set():
                raise Cancelled("stopped")
            image = np.moveaxis(labels, prompt.axis, 0)[prompt.index]
            if prompt.box is not None:
                x0, y0, x1, y1 = np.rint(prompt.box).astype(int)
                image[y0 : y1 + 1, x0 : x1 + 1] = prompt.obj_id
            if prompt.mask is not None:
                image[prompt.mask] = prompt.obj_id
            if prompt.points is not None:
                for (x, y), positive in zip(prompt.points, prompt.labels, strict=True):
                    if positive:
                        image[int(round(y)), int(round(x))] = prompt.obj_id
        if self.scribble:
            volume[...] = 0
        probabilities = {p.obj_id: (labels == p.obj_id).astype(np.float32) for p in prompts}
        return SimpleNamespace(labels=labels, probabilities=probabilities, timings={})


def painted(shape, axis, index, box=None, points=()):
    """Expected [K, J, I] mask: an inclusive box (x0, y0, x1, y1) and points (x, y) on one slice."""
    mask = np.zeros(shape, dtype=bool)
    image = np.moveaxis(mask, axis, 0)[index]
    if box is not None:
        image[box[1] : box[3] + 1, box[0] : box[2] + 1] = True
    for x, y in points:
        image[y, x] = True
    return mask


def new_logic(engine=None):
    return SegmentationLogic(model=SimpleNamespace(name="oracle"), engine=engine or OracleEngine())
