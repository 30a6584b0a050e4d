"""Held-out evaluation of ``medsam2-lite``: real volumes and structures that training never saw.

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

For each structure of :data:`STRUCTURES` the prompt is the reference's box on the axial slice where it is
largest, and the whole volume is segmented, in the CT window the structure is read in (lungs in the lung
window, vertebrae in the bone window, heart and vessels in the mediastinum window, abdominal organs in the
abdomen window; MR by percentiles), by

(i) ``segment_volume``, self-sorting memory, 6 orientations; (ii) the same with SAM 2's ``"recent"`` memory;
(iii) self-sorting, 2 orientations (the prompt axis, both directions); (iv) no memory: LiteMedSAM slice by
slice from the prompt slice outwards, each slice prompted with the previous slice's box grown by the model's
``tracking_box_margin`` (the box the tracked model gets), until a slice comes back empty; (v) LiteMedSAM with
the reference box on every slice where the structure is present (an upper bound no method can use). (iv) and
(v) run LiteMedSAM itself (:func:`medsam2.lite.litemedsam_model`), without the object-score token that
medsam2-lite's decoder adds.

The 2D one-prompt setting (:func:`one_prompt_2d`): a box on the CT slice where a structure is largest is the
only prompt; ``segment_images`` then segments that structure in other CT slices and in MR slices (another
volume and modality). Baseline: the template's box, scaled, on every image, without memory.

The structures of a volume that share a window are segmented together (several objects in one call), and
every method gets the same prepared intensities.

With ``presence``, the presence head is also judged on its own (:mod:`.extent`): from the same prompt, the
object score on every axial slice of a both-ways propagation that nothing stops, and its per-slice precision
and recall of "object present" against the reference's slices.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import os
import tarfile
import tempfile
import threading
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import metrics
from ..demo import box_on_largest_slice
from ..frames import FrameStack
from ..images import segment_images
from ..memory import MemoryOptions
from ..model.sam2 import ImageFeatures, SAM2Model
from ..preprocess import prepare_intensities
from ..prompts import Prompt
from ..volume import segment_volume
from .extent import pooled_presence, presence_precision_recall, presence_scores

TOTALSEG_SDIST = "totalsegmentator-2.18.0.tar.gz"
_TOTALSEG_FILES = "totalsegmentator-2.18.0/tests/reference_files/"
_TOTALSEG_CLASSES = "totalsegmentator-2.18.0/totalsegmentator/map_to_binary.py"
_TOTALSEG_VOLUMES = ("TotalSegmentator CT", "TotalSegmentator MR", "TotalSegmentator chest CT")
# The 2D one-prompt setting: the template volume, and the other modality.
_ONE_PROMPT_VOLUMES = ("TotalSegmentator CT", "TotalSegmentator MR")

# Compact structures with a box-shaped extent on their slices (ribs, the body outline and costal cartilage
# are not something one box describes).
STRUCTURES = {
    "CTChest4": ("right lung", "left lung", "thoracic vertebral column", "lumbar vertebral column"),
    "TotalSegmentator CT": ("liver", "spleen", "stomach", "kidney_right", "kidney_left"),
    "TotalSegmentator MR": ("liver", "spleen", "stomach", "kidney_right", "kidney_left"),
    "TotalSegmentator chest CT": ("heart", "aorta", "pulmonary_artery", "vertebrae_T12"),
}
# The chest CT of TotalSegmentator's aorta and pulmonary reports: 1.5 mm, resampled to the 3 mm of the other
# TotalSegmentator files; each structure is a binary file on the CT's grid or on a crop of it.
_CHEST_CT = "aorta_report/example_ct.nii.gz"
_CHEST_CT_MASKS = {
    "heart": "pulmonary_report/models/heart.nii.gz",
    "aorta": "aorta_report/test_result/models/aorta.nii.gz",
    "pulmonary_artery": "pulmonary_report/models/pulmonary_artery.nii.gz",
    "vertebrae_T12": "aorta_report/test_result/models/vertebrae_T12.nii.gz",
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
}
METHODS = (
    "(i) self-sorting, 6 orientations",
    "(ii) recent, 6 orientations",
    "(iii) self-sorting, 2 orientations",
    "(iv) no memory, previous box",
    "(v) reference box every slice",
)

# The presence head on its own, timed with the methods (:mod:`.extent`).
PRESENCE = "presence"

# The options of segment_volume that make methods (i)-(iii).
MEMORY_RUNS = {
    METHODS[0]: dict(orientations=6, memory=MemoryOptions(policy="self-sorting")),
    METHODS[1]: dict(orientations=6, memory=MemoryOptions(policy="recent")),
    METHODS[2]: dict(orientations=2, memory=MemoryOptions(policy="self-sorting")),
}


@dataclass
class HeldOutVolume:
    """``image`` ``[Z, Y, X]`` as stored; ``labels`` on the same grid; ``structures``: name -> label value."""

    name: str
    image: np.ndarray
    spacing: tuple[float, float, float]
    modality: str
    labels: np.ndarray
    structures: dict[str, int]

    def mask(self, structure: str) -> np.ndarray:
        return self.labels == self.structures[structure]

    def window(self, structure: str) -> str | None:
        """The CT window ``structure`` is segmented in (``None``: the modality's default preparation)."""
        return CT_WINDOWS.get(structure) if self.modality == "ct" else None


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
        source = archive.extractfile(_TOTALSEG_CLASSES).read().decode()
        class_maps = _class_maps(source)

        def read(name: str) -> sitk.Image:
            path = Path(tmp) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(archive.extractfile(_TOTALSEG_FILES + name).read())
            return sitk.ReadImage(str(path))

        for name, modality, image_file, label_file, task in (
            ("TotalSegmentator CT", "ct", "example_ct_sm.nii.gz", "example_seg.nii.gz", "total"),
            ("TotalSegmentator MR", "mr", "example_mr_sm.nii.gz", "example_seg_mr.nii.gz", "total_mr"),
        ):
            if name not in names:
                continue
            image, labels = read(image_file), read(label_file)
            values = {n: v for v, n in class_maps[task].items()}
            out.append(
                HeldOutVolume(
                    name,
                    sitk.GetArrayFromImage(image).astype(np.float32),
                    tuple(reversed(image.GetSpacing())),
                    modality,
                    sitk.GetArrayFromImage(labels),
                    {s: values[s] for s in STRUCTURES[name]},
                )
            )
        if "TotalSegmentator chest CT" in names:
            out.append(_chest_ct(read))
    return out


def _chest_ct(read) -> HeldOutVolume:
    """TotalSegmentator's chest CT on a 3 mm grid (linear), its structures' masks resampled onto it
    (nearest) through their own geometry, numbered in the order of :data:`STRUCTURES`."""
    import SimpleITK as sitk

    native = read(_CHEST_CT)
    size = [round(n * s / _CHEST_CT_SPACING_MM) for n, s in zip(native.GetSize(), native.GetSpacing())]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetOrigin(native.GetOrigin())
    grid.SetDirection(native.GetDirection())
    grid.SetSpacing([_CHEST_CT_SPACING_MM] * 3)
    image = sitk.Resample(native, grid, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    name = "TotalSegmentator chest CT"
    labels = np.zeros(tuple(reversed(size)), np.uint8)
    for value, structure in enumerate(STRUCTURES[name], start=1):
        mask = sitk.Resample(
            read(_CHEST_CT_MASKS[structure]), grid, sitk.Transform(), sitk.sitkNearestNeighbor
        )
        labels[sitk.GetArrayFromImage(mask) > 0] = value
    return HeldOutVolume(
        name,
        sitk.GetArrayFromImage(image),
        (_CHEST_CT_SPACING_MM,) * 3,
        "ct",
        labels,
        {s: v for v, s in enumerate(STRUCTURES[name], start=1)},
    )


def _class_maps(source: str) -> dict[str, dict[int, str]]:
    """TotalSegmentator's ``class_map`` literal (label value -> name per task), read without running it."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "class_map":
            return ast.literal_eval(node.value)
    raise ValueError("TotalSegmentator's class_map was not found in map_to_binary.py")


# ------------------------------------------------------------------ no-memory slice-by-slice methods


class AxialSlices:
    """LiteMedSAM on the axial slices of prepared intensities ``[Z, Y, X]``, features encoded once."""

    def __init__(self, model: SAM2Model, intensities: np.ndarray) -> None:
        self.model = model
        self.stack = FrameStack(intensities, model.config)
        self._features: dict[int, ImageFeatures] = {}

    @torch.inference_mode()
    def box_logits(self, z: int, box_model: torch.Tensor) -> torch.Tensor:
        """The decoder's logits ``[1, 1, 4h, 4w]`` for a box ``[1, 2, 2]`` in model pixels, without memory and
        without the object-score gate (LiteMedSAM's own answer)."""
        if z not in self._features:
            self._features[z] = self.model.encode_image(self.stack.model_input(z, self.model.device))
        labels = torch.tensor([[2, 3]], dtype=torch.int32, device=self.model.device)
        prediction = self.model.predict(self._features[z], None, points=(box_model, labels))
        return prediction.candidate_logits[:, :1]

    def to_frame(self, logits: torch.Tensor) -> np.ndarray:
        return (self.stack.logits_to_frame(logits)[0] > 0).cpu().numpy()

    def box_to_model(self, box: tuple[float, float, float, float]) -> torch.Tensor:
        corners = self.stack.to_model_coords(np.asarray(box, dtype=np.float64).reshape(2, 2))
        return torch.tensor(corners[None], dtype=torch.float32, device=self.model.device)


def previous_box_chain(
    slices: AxialSlices, start: int, box: tuple[int, int, int, int], stops: Collection[int] = ()
) -> np.ndarray:
    """Method (iv): from the prompted slice outwards, each slice gets the previous slice's grown box.

    Each direction also ends before any slice of ``stops`` (slices answered otherwise, e.g. a user's
    correction, :mod:`medsam2.train.corrections`)."""
    shape = (len(slices.stack), slices.stack.height, slices.stack.width)
    result = np.zeros(shape, bool)
    first = slices.box_logits(start, slices.box_to_model(box))
    result[start] = slices.to_frame(first)
    for step in (1, -1):
        previous, z = first, start + step
        while 0 <= z < shape[0] and z not in stops:
            if bool(slices.model.lost_objects(previous).any()):
                break
            grown = slices.model.tracking_prompt(previous)
            previous = slices.box_logits(z, grown[0])
            result[z] = slices.to_frame(previous)
            z += step
    return result


def reference_box_every_slice(slices: AxialSlices, reference: np.ndarray) -> np.ndarray:
    """Method (v): the reference's box on every slice where the structure is present."""
    result = np.zeros(reference.shape, bool)
    for z in np.nonzero(reference.any(axis=(1, 2)))[0]:
        rows, cols = np.nonzero(reference[z])
        box = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        result[z] = slices.to_frame(slices.box_logits(int(z), slices.box_to_model(box)))
    return result


# ------------------------------------------------------------------ the evaluation


@contextlib.contextmanager
def shared_encoder(model: SAM2Model) -> Iterator[dict]:
    """Within the block the model encodes each distinct input image once (methods (i)-(iii) visit the same
    slices); yields the statistics ``{"encoded": n, "reused": n}``."""
    cache: dict[str, ImageFeatures] = {}
    stats = {"encoded": 0, "reused": 0}
    encode = model.encode_image

    def cached(images: torch.Tensor) -> ImageFeatures:
        key = hashlib.sha1(images.detach().cpu().numpy().tobytes()).hexdigest() + str(tuple(images.shape))
        if key in cache:
            stats["reused"] += 1
        else:
            stats["encoded"] += 1
            cache[key] = encode(images)
        return cache[key]

    model.encode_image = cached
    try:
        yield stats
    finally:
        del model.encode_image


def evaluate_volume(
    model: SAM2Model,
    volume: HeldOutVolume,
    baseline: SAM2Model | None = None,
    log=print,
    corrections: int = 0,
    presence: bool = False,
) -> dict:
    """Dice / HD95 per structure and method, and seconds per method, for one held-out volume.

    ``baseline``: the model of the no-memory methods (iv) and (v) (default: ``model``). ``corrections`` > 0
    adds the Dice of (i)-(iv) after 0..``corrections`` simulated corrections (:mod:`.corrections`).
    ``presence`` adds the presence head's per-slice precision and recall per structure (:mod:`.extent`)."""
    names = list(volume.structures)
    references = {name: volume.mask(name) for name in names}
    masks: dict[str, dict[str, np.ndarray]] = {m: {} for m in METHODS}
    seconds = dict.fromkeys(METHODS, 0.0)
    found: dict[str, dict] | None = {} if presence else None
    encoder_stats = {"encoded": 0, "reused": 0}
    for window in dict.fromkeys(volume.window(n) for n in names):
        group = [n for n in names if volume.window(n) == window]
        stats = _evaluate_group(
            model, baseline or model, volume, group, window, references, masks, seconds, log, found
        )
        encoder_stats = {k: v + stats[k] for k, v in encoder_stats.items()}
    scores = {
        name: {
            method: {
                "dice": round(metrics.dice(masks[method][name], references[name]), 4),
                "hd95_mm": round(metrics.hd95(masks[method][name], references[name], volume.spacing), 2),
                "volume_ratio": round(float(masks[method][name].sum() / max(references[name].sum(), 1)), 3),
            }
            for method in METHODS
        }
        for name in names
    }
    out = {
        "shape": list(volume.image.shape),
        "spacing_mm": list(volume.spacing),
        "scores": scores,
        "seconds": {m: round(s, 1) for m, s in seconds.items()},
        "encoder": encoder_stats,
        "windows": {n: volume.window(n) for n in names},
    }
    if found is not None:
        out["presence"] = found
    if corrections:
        from .corrections import volume_corrections

        out["corrections"] = volume_corrections(model, baseline or model, volume, corrections, log)
    return out


def _evaluate_group(
    model: SAM2Model,
    baseline: SAM2Model,
    volume: HeldOutVolume,
    names: list[str],
    window: str | None,
    references: dict[str, np.ndarray],
    masks: dict[str, dict[str, np.ndarray]],
    seconds: dict[str, float],
    log,
    presence: dict[str, dict] | None = None,
) -> dict[str, int]:
    """Every method on the structures ``names`` (segmented together, in ``window``): adds their masks and
    the seconds taken to ``masks`` / ``seconds``, and each structure's presence figures to ``presence``
    unless it is ``None``; returns the shared encoder's statistics."""
    prompts = []
    for obj_id, name in enumerate(names, start=1):
        index, box = box_on_largest_slice(references[name])
        prompts.append(Prompt(axis=0, index=index, obj_id=obj_id, box=box))
    prepared = dict(spacing=volume.spacing, modality=volume.modality, window=window)
    with shared_encoder(model) as encoder_stats:
        for method, options in MEMORY_RUNS.items():
            started = time.perf_counter()
            result = segment_volume(model, volume.image, prompts, **prepared, **options)
            seconds[method] += time.perf_counter() - started
            masks[method].update({n: result.probabilities[i] > 0.5 for i, n in enumerate(names, start=1)})
            log(f"  {volume.name} ({window or volume.modality}): {method} in {seconds[method]:.0f} s")
    intensities = prepare_intensities(volume.image, modality=volume.modality, window=window)
    slices = AxialSlices(baseline, intensities)
    for method, run in (
        (METHODS[3], lambda p, n: previous_box_chain(slices, p.index, tuple(p.box))),
        (METHODS[4], lambda p, n: reference_box_every_slice(slices, references[n])),
    ):
        started = time.perf_counter()
        masks[method].update({n: run(p, n) for p, n in zip(prompts, names)})
        seconds[method] += time.perf_counter() - started
        log(f"  {volume.name} ({window or volume.modality}): {method} in {seconds[method]:.0f} s")
    if presence is not None:
        started = time.perf_counter()
        with shared_encoder(model) as stats:
            for p, n in zip(prompts, names):
                scores = presence_scores(model, intensities, p.index, tuple(p.box))
                presence[n] = {
                    **presence_precision_recall(scores, references[n]),
                    "object_scores": [round(float(s), 3) for s in scores],
                }
        seconds[PRESENCE] = seconds.get(PRESENCE, 0.0) + time.perf_counter() - started
        log(f"  {volume.name} ({window or volume.modality}): presence in {seconds[PRESENCE]:.0f} s")
        encoder_stats = {k: v + stats[k] for k, v in encoder_stats.items()}
    return dict(encoder_stats)


def one_prompt_2d(
    model: SAM2Model,
    volumes: list[HeldOutVolume],
    baseline: SAM2Model | None = None,
    images_per_volume: int = 4,
) -> dict:
    """The 2D one-prompt setting between the TotalSegmentator CT (template) and MR volumes."""
    by_name = {v.name: v for v in volumes}
    if not set(_ONE_PROMPT_VOLUMES) <= set(by_name):
        return {}
    ct, mr = (by_name[n] for n in _ONE_PROMPT_VOLUMES)
    ct_int, mr_int = (prepare_intensities(v.image, modality=v.modality) for v in (ct, mr))
    out = {}
    for name in sorted(set(ct.structures) & set(mr.structures)):
        ct_mask, mr_mask = ct.mask(name), mr.mask(name)
        template, box = box_on_largest_slice(ct_mask)
        images, truths, sources = [ct_int[template]], [ct_mask[template]], ["CT template"]
        for source, intensities, mask in (("CT", ct_int, ct_mask), ("MR", mr_int, mr_mask)):
            present = np.nonzero(mask.any(axis=(1, 2)))[0]
            picks = np.unique(
                present[np.linspace(0, len(present) - 1, images_per_volume + 2)[1:-1].astype(int)]
            )
            for z in picks:
                if source == "CT" and z == template:
                    continue
                images.append(intensities[z])
                truths.append(mask[z])
                sources.append(source)
        predicted = segment_images(model, images, box=box)
        transferred = [
            _template_box_answer(baseline or model, image, box, ct_int.shape[1:]) for image in images[1:]
        ]
        rows = []
        for i in range(1, len(images)):
            rows.append(
                {
                    "source": sources[i],
                    "one_prompt_dice": round(metrics.dice(predicted[i], truths[i]), 4),
                    "template_box_dice": round(metrics.dice(transferred[i - 1], truths[i]), 4),
                }
            )
        out[name] = rows
    return out


def _template_box_answer(
    model: SAM2Model, image: np.ndarray, box: tuple[int, ...], template_shape: tuple[int, int]
) -> np.ndarray:
    """LiteMedSAM on ``image`` with the template's box scaled to the image's size (no memory)."""
    sy, sx = image.shape[0] / template_shape[0], image.shape[1] / template_shape[1]
    scaled = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    slices = AxialSlices(model, image[None])
    return slices.to_frame(slices.box_logits(0, slices.box_to_model(scaled)))


def summarize(results: dict) -> dict:
    """Mean Dice per method over every structure of every volume, and (i) minus (iv) per structure."""
    rows = [s for v in results["volumes"].values() for s in v["scores"].values()]
    mean = {m: round(float(np.mean([r[m]["dice"] for r in rows])), 4) for m in METHODS}
    gain = {
        f"{volume}: {name}": round(s[METHODS[0]]["dice"] - s[METHODS[3]]["dice"], 4)
        for volume, v in results["volumes"].items()
        for name, s in v["scores"].items()
    }
    by_volume = {
        volume: {m: round(float(np.mean([s[m]["dice"] for s in v["scores"].values()])), 4) for m in METHODS}
        for volume, v in results["volumes"].items()
    }
    summary = {
        "mean_dice": mean,
        "mean_dice_by_volume": by_volume,
        "i_minus_iv": gain,
        "i_loses_on": [k for k, d in gain.items() if d < 0],
    }
    presence = {
        volume: [v["presence"][name] for name in v["scores"]]
        for volume, v in results["volumes"].items()
        if "presence" in v
    }
    if presence:
        summary["presence"] = {
            "by_volume": {volume: pooled_presence(rows) for volume, rows in presence.items()},
            "all": pooled_presence([r for rows in presence.values() for r in rows]),
        }
    return summary


ONE_PROMPT_JOB = "2D one-prompt"


def load_models(weights: Path, litemedsam: str | Path | None = None) -> tuple[SAM2Model, SAM2Model]:
    """``medsam2-lite`` with the trained ``weights``, and LiteMedSAM alone (the no-memory baseline)."""
    from ..checkpoint import read_state_dict
    from ..configs import ModelConfig
    from ..lite import PRESET, assemble_state_dict, litemedsam_model
    from ..model.build import build_model

    model = build_model(ModelConfig.preset(PRESET))
    model.load_state_dict(assemble_state_dict(read_state_dict(weights), litemedsam), strict=True)
    return model.eval(), litemedsam_model(litemedsam)


def exit_with_parent(parent_pid: int, poll_seconds: float = 1.0) -> None:
    """A worker's initializer: end the worker once its parent has gone.

    A pool's workers outlive a parent that was killed; left running, they would share the CPU with the next
    run and inflate its timings.
    """

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _run_job(
    job: str,
    weights: Path,
    litemedsam: str | Path | None,
    data_dir: Path,
    corrections: int,
    presence: bool,
    threads: int,
) -> dict:
    """One volume's evaluation, or the 2D one-prompt setting (a worker process's whole task)."""
    torch.set_num_threads(threads)
    model, baseline = load_models(weights, litemedsam)
    volumes = held_out_volumes(data_dir, _ONE_PROMPT_VOLUMES if job == ONE_PROMPT_JOB else [job])
    if job == ONE_PROMPT_JOB:
        started = time.perf_counter()
        return {"rows": one_prompt_2d(model, volumes, baseline), "seconds": time.perf_counter() - started}
    volume = next(v for v in volumes if v.name == job)
    return evaluate_volume(
        model, volume, baseline, log=lambda message: None, corrections=corrections, presence=presence
    )


def evaluate(
    weights: Path,
    data_dir: Path,
    litemedsam: str | Path | None = None,
    jobs: int = 1,
    only: list[str] | None = None,
    log=print,
    corrections: int = 0,
    presence: bool = False,
) -> dict:
    """The held-out evaluation of the trained ``weights`` (see the module docstring): every volume and the
    2D setting, or the ``only`` ones (volume names, :data:`ONE_PROMPT_JOB`).

    ``jobs`` > 1 evaluates the volumes (and the 2D setting) in that many processes of one thread each; the
    seconds per method are then those of a process sharing the machine. ``corrections`` > 0 adds the
    simulated user's corrections (:mod:`.corrections`); ``presence`` the presence head's per-slice precision
    and recall (:mod:`.extent`).
    """
    if corrections < 0:
        raise ValueError(f"corrections must be 0 (off) or more, got {corrections}")
    names = held_out_names(data_dir) + [ONE_PROMPT_JOB]
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ValueError(f"unknown evaluation part {unknown}; choose from {names}")
        names = [n for n in names if n in only]
    args = (weights, litemedsam, data_dir, corrections, presence)
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            jobs, mp_context=context, initializer=exit_with_parent, initargs=(os.getpid(),)
        ) as pool:
            futures = {name: pool.submit(_run_job, name, *args, 1) for name in names}
            done = {name: future.result() for name, future in futures.items()}
    else:
        done = {}
        for name in names:
            log(f"evaluating {name}")
            done[name] = _run_job(name, *args, torch.get_num_threads())
    two_d = done.pop(ONE_PROMPT_JOB, None)
    results = {"volumes": done}
    if done:
        results["summary"] = summarize(results)
        if corrections:
            from .corrections import summarize_corrections

            results["corrections"] = summarize_corrections(done)
    if two_d is not None:
        results["one_prompt_2d"] = two_d["rows"]
        results["one_prompt_2d_seconds"] = round(two_d["seconds"], 1)
    return results


def _presence_markdown(presence: dict) -> str:
    """The presence head's per-slice precision / recall of "object present" per volume and overall."""
    lines = [
        "Presence head on its own (object score > 0 on each axial slice, tracked from the prompt in both"
        " directions with nothing stopping):",
        "",
        "| volume | structures | mean precision | mean recall | pooled precision | pooled recall |",
        "|---|---|---|---|---|---|",
    ]
    rows = [*presence["by_volume"].items(), ("**all**", presence["all"])]
    for volume, p in rows:
        lines.append(
            f"| {volume} | {p['structures']} | {p['mean_precision']:.3f} | {p['mean_recall']:.3f} |"
            f" {p['pooled_precision']:.3f} | {p['pooled_recall']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def markdown(results: dict) -> str:
    """The per-structure Dice / HD95 table, the means and timings, and the 2D one-prompt table."""
    short = [m.split(")")[0] + ")" for m in METHODS]
    lines = ["| volume | structure | " + " | ".join(short) + " |", "|---|---|" + "---|" * len(METHODS)]
    for volume, v in results["volumes"].items():
        for name, s in v["scores"].items():
            cells = [f"{s[m]['dice']:.3f} / {s[m]['hd95_mm']:.1f}" for m in METHODS]
            lines.append(f"| {volume} | {name} | " + " | ".join(cells) + " |")
    if "summary" in results:
        for volume, mean in results["summary"]["mean_dice_by_volume"].items():
            lines.append(f"| {volume} | mean Dice | " + " | ".join(f"{mean[m]:.3f}" for m in METHODS) + " |")
        mean = results["summary"]["mean_dice"]
        lines.append("| **mean Dice** | | " + " | ".join(f"**{mean[m]:.3f}**" for m in METHODS) + " |")
    parts = list(METHODS) + (
        [PRESENCE] if any(PRESENCE in v["seconds"] for v in results["volumes"].values()) else []
    )
    lines += ["", "Seconds per volume (all its structures together):", ""]
    lines += ["| volume | " + " | ".join(short + parts[len(METHODS) :]) + " |", "|---|" + "---|" * len(parts)]
    for volume, v in results["volumes"].items():
        cells = [f"{v['seconds'][m]:.0f}" if m in v["seconds"] else "" for m in parts]
        lines.append(f"| {volume} | " + " | ".join(cells) + " |")
    if "presence" in results.get("summary", {}):
        lines += ["", _presence_markdown(results["summary"]["presence"]).rstrip("\n")]
    if results.get("corrections"):
        from .corrections import corrections_markdown

        lines += ["", corrections_markdown(results["corrections"]).rstrip("\n")]
    if results.get("one_prompt_2d"):
        lines += ["", "| structure | image from | one-prompt Dice (memory) | template box, no memory |"]
        lines.append("|---|---|---|---|")
        for name, rows in results["one_prompt_2d"].items():
            for source in ("CT", "MR"):
                mine = [r for r in rows if r["source"] == source]
                if mine:
                    a = np.mean([r["one_prompt_dice"] for r in mine])
                    b = np.mean([r["template_box_dice"] for r in mine])
                    lines.append(f"| {name} | {source} ({len(mine)} slices) | {a:.3f} | {b:.3f} |")
    return "\n".join(lines) + "\n"
