"""Reading images and writing label maps with their geometry kept (SimpleITK).

Arrays follow SimpleITK's numpy order: a volume is ``[Z, Y, X]`` and a 2D image ``[Y, X]``. Geometry follows
SimpleITK's physical order: ``spacing`` and ``origin`` are ``(x, y, z)`` in mm (LPS), and ``direction[:, i]``
is the unit vector of array axis ``X, Y, Z`` (i = 0, 1, 2) in physical space.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError

LABEL_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")
VOLUME_FORMATS = (
    "NIfTI (.nii, .nii.gz), NRRD (.nrrd), MetaImage (.mha, .mhd) or a folder holding a DICOM series"
)

# First colours of Slicer's GenericAnatomyColors table, so written segments look as Slicer would show them.
SEGMENT_COLORS = (
    (128, 174, 128),
    (241, 214, 145),
    (177, 122, 101),
    (111, 184, 210),
    (216, 101, 79),
    (221, 130, 101),
    (144, 238, 144),
    (192, 104, 88),
    (220, 245, 20),
    (78, 63, 0),
    (255, 250, 220),
    (230, 220, 70),
)

# Geometry of two grids counts as the same within these tolerances: NIfTI keeps its geometry in float32.
_GEOMETRY_RTOL = 1e-5
_GEOMETRY_ATOL = 1e-4


@dataclass
class Image:
    """An image and where it lies in the patient.

    ``array`` is ``[Z, Y, X]`` (``[Y, X]`` for a 2D image) in the file's own dtype. ``spacing`` and ``origin``
    are ``(x, y, z)`` mm, SimpleITK order; ``spacing_zyx`` gives the spacing in array-axis order.
    ``direction`` is ``[D, D]`` with column ``i`` the physical direction of index axis ``i`` (x first).
    ``sitk_image`` carries the file's metadata (for a DICOM series, the tags of its first slice).
    ``files`` are the files the image was read from.
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: np.ndarray
    sitk_image: sitk.Image | None = field(default=None, repr=False)
    files: tuple[str, ...] = ()

    @property
    def spacing_zyx(self) -> tuple[float, ...]:
        """Spacing in the order of the array axes (``z, y, x``), as ``metrics.hd95`` takes it."""
        return tuple(reversed(self.spacing))

    @classmethod
    def from_array(
        cls,
        array: np.ndarray,
        spacing: tuple[float, ...] | None = None,
        origin: tuple[float, ...] | None = None,
        direction: np.ndarray | None = None,
    ) -> Image:
        """An image made in memory; geometry defaults to unit spacing, zero origin, identity direction."""
        array = np.asarray(array)
        dim = array.ndim
        image = cls(
            array=array,
            spacing=tuple(float(s) for s in (spacing if spacing is not None else [1.0] * dim)),
            origin=tuple(float(o) for o in (origin if origin is not None else [0.0] * dim)),
            direction=np.asarray(direction if direction is not None else np.eye(dim), dtype=np.float64),
        )
        image.sitk_image = image.to_sitk(array)
        return image

    def to_sitk(self, array: np.ndarray) -> sitk.Image:
        """A SimpleITK image of ``array`` (this image's shape) placed on this image's grid."""
        if array.shape != self.array.shape:
            raise InputError(f"Array shape {array.shape} does not match the image grid {self.array.shape}")
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(tuple(np.asarray(self.direction, dtype=np.float64).ravel()))
        return image


@dataclass
class LabelMap:
    """Label values on a grid: ``image.array`` is ``[Z, Y, X]`` uint8/uint16, 0 = background.

    ``names`` and ``colors`` (RGB in 0..1) are keyed by label value; they come from a ``.seg.nrrd`` file
    and are empty for a plain label map.
    """

    image: Image
    names: dict[int, str] = field(default_factory=dict)
    colors: dict[int, tuple[float, float, float]] = field(default_factory=dict)

    @property
    def array(self) -> np.ndarray:
        return self.image.array


def read_image(path: str | os.PathLike, require_3d: bool = True, series_id: str | None = None) -> Image:
    """Read a scalar image: NIfTI, NRRD, MHA/MHD, or a folder holding a DICOM series.

    For a DICOM folder the series with the most files is read unless ``series_id`` names one. With
    ``require_3d`` the image must be a volume with more than one slice along each axis. Raises
    ``InputError`` for a missing or unreadable file, a 2D image where a volume is needed, a 4D or
    multi-component (RGB, vector) image, NaN or infinite values, and an image of constant intensity.
    """
    path = Path(path)
    image, files = _read_sitk(path, series_id)
    _check_scalar(image, path)
    dim = image.GetDimension()
    if dim > 3:
        raise InputError(
            f"{path} is a {dim}D image (size {image.GetSize()}): expected a single 3D volume. "
            "Extract one time point or channel first."
        )
    if require_3d and (dim < 3 or min(image.GetSize()) < 2):
        raise InputError(
            f"{path} is a 2D image (size {image.GetSize()}): expected a 3D volume with several slices. "
            "Use the 2D image mode for single images."
        )
    result = _to_image(image, files)
    _check_values(result.array, path)
    if result.array.min() == result.array.max():
        raise InputError(
            f"{path} has the same intensity ({result.array.flat[0]}) in every voxel: nothing to segment"
        )
    return result


def read_2d_image(path: str | os.PathLike) -> np.ndarray:
    """Read a 2D picture (PNG, JPEG, BMP, TIFF, a 2D DICOM file, ...) as ``[H, W]`` or RGB ``[H, W, 3]``.

    An alpha channel is dropped; the dtype is the file's own.
    """
    path = Path(path)
    image, _ = _read_sitk(path, None)
    size = image.GetSize()
    if image.GetDimension() == 3 and size[2] == 1:
        image = image[:, :, 0]
    if image.GetDimension() != 2:
        raise InputError(f"{path} is a {image.GetDimension()}D image (size {size}): expected a 2D picture")
    channels = image.GetNumberOfComponentsPerPixel()
    array = sitk.GetArrayFromImage(image)
    if channels == 2:  # grey + alpha
        array = array[..., 0]
    elif channels in (3, 4):  # RGB (+ alpha)
        array = array[..., :3]
    elif channels != 1:
        raise InputError(f"{path} has {channels} channels per pixel: expected grey-level or RGB")
    _check_values(array, path)
    return np.ascontiguousarray(array)


def read_labels(path: str | os.PathLike, reference: Image | None = None) -> LabelMap:
    """Read a label map (any scalar integer image) or a Slicer ``.seg.nrrd`` segmentation.

    A single-layer ``.seg.nrrd`` keeps its label values. Segments stored in several layers are renumbered
    1..N in segment order, which needs them not to overlap. With ``reference`` the labels are returned on
    the reference's grid: unchanged when the grids match, otherwise resampled with nearest neighbour.
    """
    path = Path(path)
    image, files = _read_sitk(path, None)
    names: dict[int, str] = {}
    colors: dict[int, tuple[float, float, float]] = {}
    if image.GetDimension() not in (2, 3):
        raise InputError(f"{path} is a {image.GetDimension()}D image: expected a 2D or 3D label map")
    if _segments_in_at(image):
        array, names, colors = _flatten_segments(image, path)
    else:
        _check_scalar(image, path)
        array = _as_label_values(sitk.GetArrayFromImage(image), path)
    labels = LabelMap(image=_to_image(image, files, array), names=names, colors=colors)
    if reference is not None:
        labels.image = _onto_grid(labels.image, reference, path)
    return labels


def write_labels(
    labels: np.ndarray,
    reference: Image,
    path: str | os.PathLike,
    names: Mapping[int, str] | None = None,
    colors: Mapping[int, tuple[float, float, float]] | None = None,
) -> Path:
    """Write ``labels`` (``[Z, Y, X]``, integer values 0..65535) on ``reference``'s exact grid.

    The format follows the suffix: ``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha`` or ``.seg.nrrd`` (a Slicer
    segmentation with one segment per label value; ``names`` and ``colors`` (RGB 0..1) are keyed by label
    value). The file appears complete or not at all, and the reference's own files are never overwritten.
    """
    path = Path(path)
    suffix = _label_suffix(path)
    labels = np.asarray(labels)
    if labels.shape != reference.array.shape:
        raise InputError(f"Labels of shape {labels.shape} do not fit the image grid {reference.array.shape}")
    labels = _as_label_values(labels, path)
    _refuse_input(path, reference)
    image = reference.to_sitk(labels)
    if suffix == ".seg.nrrd":
        if labels.ndim != 3:
            raise InputError(
                f"A .seg.nrrd segmentation needs a 3D volume, got labels of shape {labels.shape}"
            )
        _add_segment_metadata(image, labels, names or {}, colors or {})
    _write_atomic(image, path, suffix)
    return path


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write a uint8 picture, ``[H, W, 3]`` RGB or ``[H, W]`` grey, as a PNG file."""
    path = Path(path)
    rgb = np.asarray(rgb)
    if path.suffix.lower() != ".png":
        raise InputError(f"write_png writes .png files, got {path.name}")
    if rgb.dtype != np.uint8 or not (rgb.ndim == 2 or (rgb.ndim == 3 and rgb.shape[2] == 3)):
        raise InputError(f"write_png needs uint8 [H, W, 3] or [H, W], got {rgb.dtype} {rgb.shape}")
    _write_atomic(sitk.GetImageFromArray(rgb, isVector=rgb.ndim == 3), path, ".png")
    return path


def _read_sitk(path: Path, series_id: str | None) -> tuple[sitk.Image, tuple[str, ...]]:
    """The image at ``path`` (a file or a DICOM folder) and the files it was read from."""
    if not path.exists():
        raise InputError(f"No such file or folder: {path}")
    if path.is_dir():
        return _read_dicom_series(path, series_id)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(
            f"Cannot read {path} as an image ({_first_line(error)}); expected {VOLUME_FORMATS}"
        ) from None
    return image, (str(path),)


def _read_dicom_series(folder: Path, series_id: str | None) -> tuple[sitk.Image, tuple[str, ...]]:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"No DICOM series found in the folder {folder}; expected {VOLUME_FORMATS}")
    files_of = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series}
    if series_id is None:
        series_id = max(series, key=lambda sid: len(files_of[sid]))
    elif series_id not in files_of:
        raise InputError(f"DICOM series {series_id} is not in {folder}; it holds {', '.join(series)}")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files_of[series_id])
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(
            f"Cannot read the DICOM series {series_id} in {folder}: {_first_line(error)}"
        ) from None
    for key in reader.GetMetaDataKeys(0):
        with contextlib.suppress(UnicodeDecodeError):
            image.SetMetaData(key, reader.GetMetaData(0, key))
    return image, tuple(files_of[series_id])


def _to_image(image: sitk.Image, files: tuple[str, ...], array: np.ndarray | None = None) -> Image:
    """``image``'s geometry with ``array`` (by default ``image``'s own voxels)."""
    dim = image.GetDimension()
    return Image(
        array=sitk.GetArrayFromImage(image) if array is None else array,
        spacing=tuple(image.GetSpacing()),
        origin=tuple(image.GetOrigin()),
        direction=np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim),
        sitk_image=image,
        files=files,
    )


def _check_scalar(image: sitk.Image, path: Path) -> None:
    channels = image.GetNumberOfComponentsPerPixel()
    if channels != 1:
        raise InputError(
            f"{path} has {channels} components per voxel (RGB, vector field or several channels): "
            "expected a scalar grey-level image"
        )
    if "complex" in image.GetPixelIDTypeAsString():
        raise InputError(f"{path} holds complex values: expected a real-valued image")


def _check_values(array: np.ndarray, path: Path) -> None:
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise InputError(f"{path} has {bad} NaN or infinite voxels: expected finite intensities")


def _as_label_values(array: np.ndarray, path: Path) -> np.ndarray:
    """``array`` as uint8 (max <= 255) or uint16; floats are accepted when they hold whole numbers."""
    if array.dtype == bool:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or np.any(array != np.round(array)):
            raise InputError(f"{path}: label values must be whole numbers, got fractional or NaN values")
    elif not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"{path}: labels must be integers, got {array.dtype}")
    low, high = (array.min(), array.max()) if array.size else (0, 0)
    if low < 0 or high > 65535:
        raise InputError(f"{path}: label values must lie in 0..65535, got {low}..{high}")
    return array.astype(np.uint8 if high <= 255 else np.uint16)


def _segments_in_at(image: sitk.Image, index: int = 0) -> bool:
    """Whether ``image`` describes a Slicer segment number ``index`` (the first one by default)."""
    return image.HasMetaDataKey(f"Segment{index}_LabelValue") or image.HasMetaDataKey(f"Segment{index}_ID")


def _flatten_segments(
    image: sitk.Image, path: Path
) -> tuple[np.ndarray, dict[int, str], dict[int, tuple[float, float, float]]]:
    """One label map ``[Z, Y, X]`` from a Slicer segmentation whose layers are the components of ``image``."""
    layers = sitk.GetArrayFromImage(image)
    single_layer = image.GetNumberOfComponentsPerPixel() == 1
    if single_layer:
        layers = layers[..., None]
    segments = []
    while _segments_in_at(image, len(segments)):
        prefix = f"Segment{len(segments)}_"
        keys = ("ID", "Name", "Color", "LabelValue", "Layer")
        segments.append({k: image.GetMetaData(prefix + k) for k in keys if image.HasMetaDataKey(prefix + k)})
    # Label values start again in every layer, so segments spread over layers are renumbered 1..N.
    array = layers[..., 0] if single_layer else np.zeros(layers.shape[:-1], np.uint16)
    names, colors = {}, {}
    for number, segment in enumerate(segments, start=1):
        name = segment.get("Name", segment.get("ID", f"Segment_{number}"))
        value = int(segment.get("LabelValue", 1))
        if not single_layer:
            mask = layers[..., int(segment.get("Layer", 0))] == value
            taken = np.unique(array[mask])
            if taken.size and taken[-1] > 0:
                raise InputError(
                    f"{path}: segments '{names[int(taken[-1])]}' and '{name}' overlap, which a label map "
                    "cannot hold; export the overlapping segments to separate files"
                )
            value = number
            array[mask] = value
        names[value] = name
        if "Color" in segment:
            colors[value] = tuple(float(c) for c in segment["Color"].split()[:3])
    return _as_label_values(array, path), names, colors


def _same_grid(a: Image, b: Image) -> bool:
    return (
        a.array.shape == b.array.shape
        and np.allclose(a.spacing, b.spacing, rtol=_GEOMETRY_RTOL, atol=_GEOMETRY_ATOL)
        and np.allclose(a.origin, b.origin, rtol=_GEOMETRY_RTOL, atol=_GEOMETRY_ATOL)
        and np.allclose(a.direction, b.direction, atol=_GEOMETRY_ATOL)
    )


def _onto_grid(labels: Image, reference: Image, path: Path) -> Image:
    if _same_grid(labels, reference):
        return Image(
            labels.array, reference.spacing, reference.origin, reference.direction, files=labels.files
        )
    if labels.array.ndim != reference.array.ndim:
        raise InputError(
            f"{path} is {labels.array.ndim}D but the reference image is {reference.array.ndim}D: "
            "they cannot share a grid"
        )
    grid = reference.to_sitk(np.zeros(reference.array.shape, dtype=np.uint8))
    resampled = sitk.Resample(
        labels.to_sitk(labels.array), grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0
    )
    array = sitk.GetArrayFromImage(resampled)
    if labels.array.any() and not array.any():
        raise InputError(f"{path} does not overlap the reference image: its labels fall outside the image")
    return Image(array, reference.spacing, reference.origin, reference.direction, files=labels.files)


def _label_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in LABEL_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise InputError(f"Cannot write labels to {path.name}: use one of {', '.join(LABEL_SUFFIXES)}")


def _refuse_input(path: Path, reference: Image) -> None:
    target = path.resolve()
    for source in reference.files:
        if Path(source).resolve() == target:
            raise InputError(f"Refusing to overwrite the input image {source}: choose another output file")


def _add_segment_metadata(
    image: sitk.Image,
    labels: np.ndarray,
    names: Mapping[int, str],
    colors: Mapping[int, tuple[float, float, float]],
) -> None:
    """Slicer's segmentation fields: one segment per label value, all in layer 0."""
    values = sorted({int(v) for v in np.unique(labels) if v != 0} | {int(v) for v in names})
    for index, value in enumerate(values):
        color = colors.get(value)
        if color is None:
            color = tuple(c / 255 for c in SEGMENT_COLORS[(value - 1) % len(SEGMENT_COLORS)])
        elif len(color) != 3 or not all(0.0 <= float(c) <= 1.0 for c in color):
            raise InputError(f"Colour of label {value} must be three numbers in 0..1, got {color!r}")
        fields = {
            "ID": f"Segment_{value}",
            "Name": names.get(value, f"Segment_{value}"),
            "NameAutoGenerated": "0" if value in names else "1",
            "Color": " ".join(f"{float(c):.6g}" for c in color),
            "ColorAutoGenerated": "0" if value in colors else "1",
            "LabelValue": str(value),
            "Layer": "0",
            "Extent": _extent(labels == value),
            "Tags": "Segmentation.Status:inprogress|",
        }
        for key, text in fields.items():
            image.SetMetaData(f"Segment{index}_{key}", text)
    image.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    image.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    image.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")


def _extent(mask: np.ndarray) -> str:
    """``i0 i1 j0 j1 k0 k1`` (x, y, z voxel bounds) of a ``[Z, Y, X]`` mask, Slicer's empty extent if none."""
    if not mask.any():
        return "0 -1 0 -1 0 -1"
    bounds = []
    for axis in (2, 1, 0):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        bounds += [int(hits[0]), int(hits[-1])]
    return " ".join(str(b) for b in bounds)


def _write_atomic(image: sitk.Image, path: Path, suffix: str) -> None:
    """Write to a temporary file beside ``path`` and rename it, so ``path`` is never left half written."""
    if not path.parent.is_dir():
        raise InputError(f"Cannot write {path}: the folder {path.parent} does not exist")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        sitk.WriteImage(image, temporary, useCompression=suffix in (".seg.nrrd", ".nii.gz", ".nrrd", ".mha"))
        # mkstemp makes owner-only files; an output file keeps the mode it had, a new one is world-readable
        os.chmod(temporary, path.stat().st_mode & 0o7777 if path.exists() else 0o644)
        os.replace(temporary, path)
    except RuntimeError as error:
        _remove(temporary)
        raise OSError(f"Could not write {path}: {_first_line(error)}") from None
    except BaseException:
        _remove(temporary)
        raise


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _first_line(error: Exception) -> str:
    """The sentence of a SimpleITK error that says what went wrong, without its source-file location."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if ".cxx:" not in line] or lines or [type(error).__name__]
    return useful[-1].removeprefix("sitk::ERROR: ")
