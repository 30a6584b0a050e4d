"""Volume nodes as numpy arrays, and where their voxels lie in world (RAS) space.

Array order follows Slicer and SimpleITK: a volume is ``[K, J, I]``, so array axis 0 runs along the volume's
K (slice) axis, axis 1 along J and axis 2 along I. A 2D slice along array axis ``a`` is an image whose rows
and columns are the two remaining array axes in order: ``(x, y) = (column, row)`` of that image, as the
engine's :class:`medsam2.prompts.Prompt` expects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import vtk
from vtk.util import numpy_support

from medsam2.errors import InputError

# Normals of Slicer's three standard slice views, in RAS.
VIEW_NORMALS = {
    "axial": (0.0, 0.0, 1.0),
    "coronal": (0.0, 1.0, 0.0),
    "sagittal": (1.0, 0.0, 0.0),
}


def matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def numpy_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def node_to_world(node) -> np.ndarray:
    """4x4 matrix from ``node``'s own coordinates to world, i.e. all its parent transforms hardened.

    Raises ``InputError`` when a parent transform is not linear: a warped grid cannot be described by one
    matrix, so the user has to harden (resample) the node first.
    """
    transform_node = node.GetParentTransformNode()
    if transform_node is None:
        return np.eye(4)
    if not transform_node.IsTransformToWorldLinear():
        raise InputError(
            f"'{node.GetName()}' is under the non-linear transform '{transform_node.GetName()}'. "
            "Harden the transform on it (Data module: right-click > Harden transform) or use a linear "
            "transform, then try again."
        )
    matrix = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformToWorld(matrix)
    return matrix_to_numpy(matrix)


@dataclass(frozen=True)
class VolumeGeometry:
    """The voxel grid of a volume: its ``[K, J, I]`` shape and the matrix from ``(i, j, k, 1)`` to world RAS.

    ``ijk_to_world`` includes the volume node's linear parent transforms.
    """

    shape: tuple[int, int, int]
    ijk_to_world: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the array axes ``(K, J, I)``, i.e. ``[Z, Y, X]`` spacing for the engine."""
        sizes = np.linalg.norm(self.ijk_to_world[:3, :3], axis=0)  # along i, j, k
        return float(sizes[2]), float(sizes[1]), float(sizes[0])

    def world_to_kji(self, points_ras: np.ndarray) -> np.ndarray:
        """Continuous array indices ``[N, 3]`` (k, j, i) of world points ``[N, 3]``.

        Voxel centres are at whole numbers.
        """
        points = np.atleast_2d(np.asarray(points_ras, dtype=np.float64))
        homogeneous = np.c_[points, np.ones(len(points))]
        ijk = np.linalg.solve(self.ijk_to_world, homogeneous.T).T[:, :3]
        return ijk[:, ::-1]

    def kji_to_world(self, kji: np.ndarray) -> np.ndarray:
        """World RAS points ``[N, 3]`` of continuous array indices ``[N, 3]`` (k, j, i)."""
        kji = np.atleast_2d(np.asarray(kji, dtype=np.float64))
        homogeneous = np.c_[kji[:, ::-1], np.ones(len(kji))]
        return (self.ijk_to_world @ homogeneous.T).T[:, :3]

    def closest_axis(self, normal_ras: Sequence[float]) -> int:
        """The array axis (0 = K, 1 = J, 2 = I) whose direction is closest to ``normal_ras``.

        A slice view with that normal shows (approximately) slices ``volume[k]``, ``volume[:, j]`` or
        ``volume[:, :, i]`` for the returned axis 0, 1 or 2, whatever the volume's orientation.
        """
        normal = np.asarray(normal_ras, dtype=np.float64)
        directions = self.ijk_to_world[:3, :3] / np.linalg.norm(self.ijk_to_world[:3, :3], axis=0)
        ijk_axis = int(np.argmax(np.abs(normal @ directions)))
        return 2 - ijk_axis

    def view_axis(self, view: str) -> int:
        """The array axis shown by Slicer's ``"axial"``, ``"coronal"`` or ``"sagittal"`` view."""
        return self.closest_axis(VIEW_NORMALS[view])

    def resolve_axis(self, slice_axis: int | str) -> int:
        """Array axis from a view name (``"axial"``, ...) or an array axis number (0, 1, 2)."""
        if isinstance(slice_axis, str):
            if slice_axis.lower() not in VIEW_NORMALS:
                raise InputError(
                    f"Unknown slice axis {slice_axis!r}: expected 'axial', 'coronal', 'sagittal' or an "
                    "array axis 0, 1, 2"
                )
            return self.view_axis(slice_axis.lower())
        if slice_axis not in (0, 1, 2) or isinstance(slice_axis, bool):
            raise InputError(
                f"Unknown slice axis {slice_axis!r}: expected 'axial', 'coronal', 'sagittal' or an "
                "array axis 0, 1, 2"
            )
        return int(slice_axis)


def in_plane(kji: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Split array indices ``[N, 3]`` into the coordinate ``[N]`` along ``axis`` and ``(x, y)`` ``[N, 2]``.

    ``x`` is the column and ``y`` the row of the 2D slice image ``np.take(volume, index, axis)``.
    """
    kji = np.atleast_2d(kji)
    row_axis, column_axis = (a for a in range(3) if a != axis)
    return kji[:, axis], np.stack([kji[:, column_axis], kji[:, row_axis]], axis=1)


def nearest_index(coordinate: np.ndarray) -> np.ndarray:
    """Round continuous indices to the nearest voxel (halves go up, unlike numpy's round-half-even)."""
    return np.floor(np.asarray(coordinate) + 0.5).astype(np.int64)


def volume_geometry(volume_node) -> VolumeGeometry:
    """Grid of ``volume_node`` in world space (its IJK-to-RAS matrix with parent transforms hardened)."""
    image = volume_node.GetImageData()
    if image is None:
        raise InputError(f"Volume '{volume_node.GetName()}' has no image data")
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    columns, rows, slices = image.GetDimensions()
    return VolumeGeometry(
        shape=(slices, rows, columns), ijk_to_world=node_to_world(volume_node) @ matrix_to_numpy(ijk_to_ras)
    )


def volume_array(volume_node) -> np.ndarray:
    """A ``[K, J, I]`` copy of the voxels of a scalar volume node (the node is never modified through it)."""
    image = volume_node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"Volume '{volume_node.GetName()}' has no image data")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(
            f"Volume '{volume_node.GetName()}' has {image.GetNumberOfScalarComponents()} components per "
            "voxel; a scalar (single-component) volume is needed"
        )
    columns, rows, slices = image.GetDimensions()
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return voxels.reshape(slices, rows, columns).copy()
