"""medsam2.io on the CT and segmentation shipped with slicerio, and on files written by the tests."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medsam2 import io
from medsam2.errors import InputError

slicerio = pytest.importorskip("slicerio")
DATA = Path(slicerio.__file__).parent / "data"
CT = DATA / "CTChest4.nrrd"
SEGMENTATION = DATA / "Segmentation.seg.nrrd"


def _rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    """Rodrigues' rotation matrix: an oblique, orthonormal direction matrix."""
    k = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    angle = math.radians(degrees)
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


@pytest.fixture()
def oblique() -> io.Image:
    rng = np.random.default_rng(0)
    volume = rng.integers(-1000, 1000, size=(6, 7, 9)).astype(np.int16)
    return io.Image.from_array(
        volume, spacing=(0.7, 1.3, 2.9), origin=(-12.5, 30.25, 101.0), direction=_rotation((1, 2, 3), 27.0)
    )


def _assert_same_geometry(a: io.Image, b: io.Image) -> None:
    assert a.array.shape == b.array.shape
    # NIfTI stores geometry as float32, hence the tolerance.
    np.testing.assert_allclose(a.spacing, b.spacing, rtol=1e-6)
    np.testing.assert_allclose(a.origin, b.origin, atol=1e-4)
    np.testing.assert_allclose(a.direction, b.direction, atol=1e-6)


def test_read_ct_geometry() -> None:
    image = io.read_image(CT)
    assert image.array.shape == (34, 128, 128)
    assert image.array.dtype == np.int32
    assert (image.array.min(), image.array.max()) == (-3024, 3070)
    np.testing.assert_allclose(image.spacing, (3.046875954, 3.046875954, 10.0), rtol=1e-6)
    np.testing.assert_allclose(image.spacing_zyx, (10.0, 3.046875954, 3.046875954), rtol=1e-6)
    np.testing.assert_allclose(image.origin, (193.095993042, 216.395996094, -340.25), atol=1e-6)
    np.testing.assert_allclose(image.direction, np.diag([-1.0, -1.0, 1.0]), atol=1e-12)
    assert image.files == (str(CT),)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".seg.nrrd"])
def test_labels_round_trip_on_oblique_grid(tmp_path: Path, oblique: io.Image, suffix: str) -> None:
    labels = (np.arange(oblique.array.size).reshape(oblique.array.shape) % 4).astype(np.uint8)
    labels[0] = 0
    path = io.write_labels(labels, oblique, tmp_path / f"labels{suffix}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"labels{suffix}"]
    assert path.stat().st_mode & 0o777 == 0o644  # not the temporary file's owner-only mode

    back = io.read_labels(path)
    np.testing.assert_array_equal(back.array, labels)
    assert back.array.dtype == np.uint8
    _assert_same_geometry(back.image, oblique)
    # on the reference's grid the labels come back untouched
    np.testing.assert_array_equal(io.read_labels(path, reference=oblique).array, labels)


def test_uint16_labels_keep_their_values(tmp_path: Path, oblique: io.Image) -> None:
    labels = np.zeros(oblique.array.shape, dtype=np.uint16)
    labels[2:4, 1:5, 3:7] = 300
    labels[5, 0, 0] = 7
    back = io.read_labels(io.write_labels(labels, oblique, tmp_path / "big.nrrd"))
    assert back.array.dtype == np.uint16
    np.testing.assert_array_equal(back.array, labels)


def test_seg_nrrd_is_read_by_slicerio(tmp_path: Path) -> None:
    ct = io.read_image(CT)
    labels = io.read_labels(SEGMENTATION, reference=ct)
    names = {1: "liver", 5: "right lung", 6: "left lung"}
    colors = {5: (0.1, 0.8, 0.3)}
    path = io.write_labels(labels.array, ct, tmp_path / "out.seg.nrrd", names=names, colors=colors)

    segmentation = slicerio.read_segmentation(str(path))
    segments = {s["labelValue"]: s for s in segmentation["segments"]}
    assert sorted(segments) == [1, 2, 3, 4, 5, 6, 7]
    assert segments[1]["name"] == "liver" and segments[6]["name"] == "left lung"
    assert segments[2]["name"] == "Segment_2"
    assert segments[5]["color"] == pytest.approx([0.1, 0.8, 0.3])
    assert all(s["layer"] == 0 for s in segments.values())
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = ct.direction @ np.diag(ct.spacing)
    ijk_to_lps[:3, 3] = ct.origin
    np.testing.assert_allclose(segmentation["ijkToLPS"], ijk_to_lps, atol=1e-6)
    # slicerio's voxels are indexed (i, j, k) = (x, y, z)
    lung = slicerio.segment_mask(segmentation, "right lung")
    np.testing.assert_array_equal(lung, (labels.array == 5).transpose(2, 1, 0))
    z, y, x = np.nonzero(labels.array == 5)
    assert segments[5]["extent"] == [x.min(), x.max(), y.min(), y.max(), z.min(), z.max()]

    back = io.read_labels(path)
    assert back.names[1] == "liver" and back.names[7] == "Segment_7"
    assert back.colors[5] == pytest.approx((0.1, 0.8, 0.3))


def test_seg_nrrd_is_read_by_slicer_storage_node(tmp_path: Path, oblique: io.Image) -> None:
    slicer = pytest.importorskip("slicer")
    vtk = pytest.importorskip("vtk")
    from vtk.util.numpy_support import vtk_to_numpy

    labels = np.zeros(oblique.array.shape, np.uint8)
    labels[1:4, 2:6, 3:8] = 1
    labels[4:6, 0:3, 0:2] = 2
    path = io.write_labels(labels, oblique, tmp_path / "oblique.seg.nrrd", names={1: "tumour", 2: "cyst"})

    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 2
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    index_to_ras = lps_to_ras @ oblique.direction @ np.diag(oblique.spacing)
    for value, name in [(1, "tumour"), (2, "cyst")]:
        segment = segmentation.GetSegment(f"Segment_{value}")
        assert segment.GetName() == name and segment.GetLabelValue() == value
        labelmap = segment.GetRepresentation("Binary labelmap")
        voxels = vtk_to_numpy(labelmap.GetPointData().GetScalars())
        assert np.count_nonzero(voxels == value) == np.count_nonzero(labels == value)
        matrix = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(matrix)
        image_to_ras = np.array([[matrix.GetElement(i, j) for j in range(4)] for i in range(3)])
        np.testing.assert_allclose(image_to_ras[:, :3], index_to_ras, atol=1e-9)
        np.testing.assert_allclose(image_to_ras[:, 3], lps_to_ras @ np.asarray(oblique.origin), atol=1e-9)


def test_read_slicer_segmentation() -> None:
    labels = io.read_labels(SEGMENTATION)
    assert labels.names == {
        1: "ribs",
        2: "cervical vertebral column",
        3: "thoracic vertebral column",
        4: "lumbar vertebral column",
        5: "right lung",
        6: "left lung",
        7: "tissue",
    }
    reference = slicerio.read_segmentation(str(SEGMENTATION))
    np.testing.assert_array_equal(labels.array, reference["voxels"].transpose(2, 1, 0))


def test_multi_layer_segmentation_is_flattened_or_refused(tmp_path: Path) -> None:
    layers = np.zeros((4, 5, 6, 2), dtype=np.uint8)
    layers[0, :, :, 0] = 1
    layers[1, :, :, 0] = 2
    layers[3, :, :, 1] = 1  # a segment of the second layer that overlaps nothing
    image = sitk.GetImageFromArray(layers, isVector=True)
    for index, (name, value, layer) in enumerate([("a", 1, 0), ("b", 2, 0), ("c", 1, 1)]):
        image.SetMetaData(f"Segment{index}_Name", name)
        image.SetMetaData(f"Segment{index}_LabelValue", str(value))
        image.SetMetaData(f"Segment{index}_Layer", str(layer))
    sitk.WriteImage(image, str(tmp_path / "layers.seg.nrrd"))
    labels = io.read_labels(tmp_path / "layers.seg.nrrd")
    assert labels.names == {1: "a", 2: "b", 3: "c"}
    assert [int(labels.array[z, 0, 0]) for z in range(4)] == [1, 2, 0, 3]

    with pytest.raises(InputError, match="'tissue' and 'overlapping sphere' overlap"):
        io.read_labels(DATA / "SegmentationOverlapping.seg.nrrd")


def test_labels_are_resampled_onto_reference_grid(tmp_path: Path) -> None:
    coarse = io.Image.from_array(np.zeros((4, 4, 4), np.int16), spacing=(2.0, 2.0, 2.0))
    labels = np.arange(64, dtype=np.uint8).reshape(4, 4, 4)
    path = io.write_labels(labels, coarse, tmp_path / "coarse.nii.gz")
    # fine voxel i sits at i - 0.25 mm, nearest coarse voxel i // 2: no ties to break
    fine = io.Image.from_array(np.zeros((8, 8, 8), np.int16), spacing=(1.0, 1.0, 1.0), origin=(-0.25,) * 3)
    resampled = io.read_labels(path, reference=fine)
    expected = labels.repeat(2, axis=0).repeat(2, axis=1).repeat(2, axis=2)
    np.testing.assert_array_equal(resampled.array, expected)
    assert resampled.image.spacing == fine.spacing

    far = io.Image.from_array(np.zeros((4, 4, 4), np.int16), origin=(500.0, 0.0, 0.0))
    with pytest.raises(InputError, match="does not overlap"):
        io.read_labels(path, reference=far)


def test_failed_write_leaves_nothing_behind(tmp_path: Path, oblique: io.Image, monkeypatch) -> None:
    labels = np.ones(oblique.array.shape, dtype=np.uint8)
    target = tmp_path / "out.nii.gz"
    target.write_bytes(b"previous result")

    def write_half_then_fail(image, filename, useCompression=False):
        Path(filename).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(io.sitk, "WriteImage", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        io.write_labels(labels, oblique, target)
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]
    assert target.read_bytes() == b"previous result"


def test_write_refusals(tmp_path: Path, oblique: io.Image) -> None:
    labels = np.ones(oblique.array.shape, dtype=np.uint8)
    with pytest.raises(InputError, match="use one of"):
        io.write_labels(labels, oblique, tmp_path / "out.png")
    with pytest.raises(InputError, match="does not exist"):
        io.write_labels(labels, oblique, tmp_path / "missing" / "out.nrrd")
    with pytest.raises(InputError, match="do not fit"):
        io.write_labels(labels[:-1], oblique, tmp_path / "out.nrrd")
    with pytest.raises(InputError, match="whole numbers"):
        io.write_labels(labels * 0.5, oblique, tmp_path / "out.nrrd")
    with pytest.raises(InputError, match="0..65535"):
        io.write_labels(labels.astype(np.int32) * -1, oblique, tmp_path / "out.nrrd")
    assert list(tmp_path.iterdir()) == []


def test_never_overwrites_the_input(tmp_path: Path) -> None:
    copy = tmp_path / "ct.nrrd"
    copy.write_bytes(CT.read_bytes())
    image = io.read_image(copy)
    with pytest.raises(InputError, match="Refusing to overwrite the input"):
        io.write_labels(np.zeros(image.array.shape, np.uint8), image, tmp_path / "." / "ct.nrrd")
    assert copy.read_bytes() == CT.read_bytes()


def _write(tmp_path: Path, name: str, image: sitk.Image) -> Path:
    path = tmp_path / name
    sitk.WriteImage(image, str(path))
    return path


def test_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="No such file or folder"):
        io.read_image(tmp_path / "nothing.nii.gz")

    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_text("not an image")
    with pytest.raises(InputError, match=r"Cannot read .*garbage.nii.gz as an image \(Unable to determine"):
        io.read_image(garbage)

    picture = _write(
        tmp_path, "slice.png", sitk.GetImageFromArray(np.arange(20, dtype=np.uint8).reshape(4, 5))
    )
    with pytest.raises(InputError, match="is a 2D image"):
        io.read_image(picture)
    assert io.read_image(picture, require_3d=False).array.shape == (4, 5)
    one_slice = _write(tmp_path, "one.nrrd", sitk.GetImageFromArray(np.arange(20.0).reshape(1, 4, 5)))
    with pytest.raises(InputError, match="is a 2D image"):
        io.read_image(one_slice)

    volume = sitk.GetImageFromArray(np.arange(60, dtype=np.int16).reshape(3, 4, 5))
    series = _write(tmp_path, "time.nii.gz", sitk.JoinSeries([volume, volume]))
    with pytest.raises(InputError, match="4D image"):
        io.read_image(series)

    rgb = _write(tmp_path, "rgb.mha", sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), np.uint8), isVector=True))
    with pytest.raises(InputError, match="3 components per voxel"):
        io.read_image(rgb)

    values = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    values[1, 2, 3] = np.nan
    with pytest.raises(InputError, match="1 NaN or infinite voxels"):
        io.read_image(_write(tmp_path, "nan.nrrd", sitk.GetImageFromArray(values)))

    flat = _write(tmp_path, "flat.nii.gz", sitk.GetImageFromArray(np.full((3, 4, 5), 7, np.int16)))
    with pytest.raises(InputError, match=r"same intensity \(7\) in every voxel"):
        io.read_image(flat)

    with pytest.raises(InputError, match="No DICOM series"):
        io.read_image(tmp_path)


def _write_dicom_series(folder: Path, volume: np.ndarray, series_uid: str, spacing, origin) -> None:
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(volume.shape[0]):
        slice_k = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{p:.6f}" for p in position),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0018|0050": str(spacing[2]),
        }
        for tag, value in tags.items():
            slice_k.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid[-1]}_{k:03d}.dcm"))
        writer.Execute(slice_k)


def test_dicom_series_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    big = rng.integers(-1000, 1500, size=(5, 6, 7)).astype(np.int16)
    small = rng.integers(0, 100, size=(3, 6, 7)).astype(np.int16)
    _write_dicom_series(tmp_path, big, "1.2.826.0.1.3680043.2.1125.7", (0.7, 0.8, 2.5), (-10.0, 20.0, 30.0))
    _write_dicom_series(tmp_path, small, "1.2.826.0.1.3680043.2.1125.8", (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))

    image = io.read_image(tmp_path)  # the series with the most files
    np.testing.assert_array_equal(image.array, big)
    np.testing.assert_allclose(image.spacing, (0.7, 0.8, 2.5), atol=1e-5)
    np.testing.assert_allclose(image.origin, (-10.0, 20.0, 30.0), atol=1e-5)
    np.testing.assert_allclose(image.direction, np.eye(3), atol=1e-6)
    assert len(image.files) == 5
    assert image.sitk_image.GetMetaData("0008|0060").strip() == "CT"

    chosen = io.read_image(tmp_path, series_id="1.2.826.0.1.3680043.2.1125.8")
    np.testing.assert_array_equal(chosen.array, small)
    with pytest.raises(InputError, match="is not in"):
        io.read_image(tmp_path, series_id="1.2.3")

    # labels written next to the series land on its grid
    labels = (image.array > 0).astype(np.uint8)
    back = io.read_labels(io.write_labels(labels, image, tmp_path / "mask.nii.gz"), reference=image)
    np.testing.assert_array_equal(back.array, labels)


def test_2d_pictures(tmp_path: Path) -> None:
    rgb = np.random.default_rng(2).integers(0, 256, size=(9, 11, 3)).astype(np.uint8)
    np.testing.assert_array_equal(io.read_2d_image(io.write_png(tmp_path / "rgb.png", rgb)), rgb)
    grey = rgb[..., 0]
    np.testing.assert_array_equal(io.read_2d_image(io.write_png(tmp_path / "grey.png", grey)), grey)

    rgba = np.concatenate([rgb, np.full((9, 11, 1), 255, np.uint8)], axis=2)
    sitk.WriteImage(sitk.GetImageFromArray(rgba, isVector=True), str(tmp_path / "rgba.png"))
    np.testing.assert_array_equal(io.read_2d_image(tmp_path / "rgba.png"), rgb)

    with pytest.raises(InputError, match="uint8"):
        io.write_png(tmp_path / "bad.png", rgb.astype(np.float32))
    with pytest.raises(InputError, match=r"\.png"):
        io.write_png(tmp_path / "bad.jpg", rgb)
    with pytest.raises(InputError, match="expected a 2D picture"):
        io.read_2d_image(CT)
