"""Choosing a training run's checkpoint on a validation volume: neither a training source nor held out.

Two runs of one recipe differ on the held-out table by more than two recipes do (BENCHMARKS 4j: the shipped
recipe continued for 400 steps lost CTChest4's lungs), so the last checkpoint of a run is not a safe choice,
and choosing among checkpoints on the held-out table would tune on it. The trainer therefore scores its
checkpoints every ``validate_every`` steps on :func:`validation_volume` and keeps the best one (``best.pt``,
:mod:`.trainer`), which ``medsam2 train export --best`` ships.

The volume: TotalSegmentator 2.18.0's DICOM test series (``tests/reference_files/example_ct_dicom``, 512 x 512 x
20, 0.98 x 0.98 x 2 mm, upper abdomen; a 2022 PET/CT of University Hospital Basel) with its reference label map
``example_seg_dicom.nii.gz`` (TotalSegmentator's own output, on a y-flipped grid; read onto the series' grid).
Another scan than the held-out ones by size, spacing and position, but whether it is another patient is not
known (the files carry no patient data). It has no lungs and no small vessels.

The score: the mean 3D Dice of method (iii) of :mod:`.evaluate` (self-sorting memory, the prompt axis both
ways, the reference's box on the axial slice where the structure is largest) over :data:`STRUCTURES` and
:data:`SMALL_STRUCTURES`, each read in its window (:data:`.heldout.CT_WINDOWS`). (iii) is the tracking pass that
training shapes. (i)'s further axes took 141 s more than (iii)'s 81 s (first call, one thread), and (i) too
put the shipped weights above the runs that lost on the held-out table (BENCHMARKS 4k). Each axial slice is
encoded once per window for the whole run (the image encoder is frozen), so later calls take about 25 s.
"""

from __future__ import annotations

import contextlib
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .. import io, metrics
from ..model.sam2 import ImageFeatures, SAM2Model
from ..volume import segment_volume
from .evaluate import MEMORY_RUNS, METHODS, cached_encoder, largest_slice_prompts
from .extent import ends_within, extent_errors
from .heldout import TOTALSEG_CLASSES, TOTALSEG_FILES, TOTALSEG_SDIST, HeldOutVolume, class_maps

VALIDATION_VOLUME = "TotalSegmentator DICOM CT"
STRUCTURES = (
    "liver",
    "spleen",
    "stomach",
    "aorta",
    "inferior_vena_cava",
    "vertebrae_T12",
    "vertebrae_T11",
)
# Under 10 ml with an axial end inside the volume (slice 10 of 20; it starts at the volume's first slice).
SMALL_STRUCTURES = ("adrenal_gland_right",)
METHOD = METHODS[2]

_SERIES = TOTALSEG_FILES + "example_ct_dicom/"
_LABELS = TOTALSEG_FILES + "example_seg_dicom.nii.gz"


def validation_volume(data_dir: str | Path) -> HeldOutVolume:
    """The validation CT and its structures, read from the TotalSegmentator sdist in ``data_dir``."""
    sdist = Path(data_dir) / TOTALSEG_SDIST
    if not sdist.is_file():
        raise FileNotFoundError(
            f"{sdist} not found: the validation volume comes from it "
            "(pip download --no-deps --no-binary :all: totalsegmentator==2.18.0)"
        )
    with tarfile.open(sdist) as archive, tempfile.TemporaryDirectory() as tmp:
        series = Path(tmp) / "series"
        series.mkdir()
        for member in archive.getmembers():
            if member.isfile() and member.name.startswith(_SERIES):
                # Written by base name: the archive never chooses where a file lands.
                (series / Path(member.name).name).write_bytes(archive.extractfile(member).read())
        labels_file = Path(tmp) / "labels.nii.gz"
        labels_file.write_bytes(archive.extractfile(_LABELS).read())
        classes = class_maps(archive.extractfile(TOTALSEG_CLASSES).read().decode())["total"]
        values = {n: v for v, n in classes.items()}
        image = io.read_image(series)
        labels = io.read_labels(labels_file, reference=image).array
    return HeldOutVolume(
        VALIDATION_VOLUME,
        image.array.astype(np.float32),
        tuple(image.spacing_zyx),
        "ct",
        labels,
        {s: values[s] for s in STRUCTURES},
        {s: labels == values[s] for s in SMALL_STRUCTURES},
    )


class Validator:
    """Scores a model on a validation volume (see the module docstring); call it with the model.

    ``presence``: the presence head's tensors (``weight``, ``bias``) the exported model will carry; training
    leaves the head fresh (it is fitted or copied after export), so without them the score would judge a model
    nobody ships. The model is left as it was: its presence head, its modules' train/eval modes, and the
    random generators, so that a run with validation trains exactly as one without it.
    """

    def __init__(self, volume: HeldOutVolume, presence: dict[str, torch.Tensor] | None = None) -> None:
        self.volume = volume
        self.presence = presence
        self.names = [*volume.structures, *volume.small]
        self.references = {n: volume.mask(n) for n in self.names}
        self._features: dict[str, ImageFeatures] = {}

    def __call__(self, model: SAM2Model) -> dict:
        """``{"score": mean Dice, "dice": {structure: Dice}, "ends_within_2": share, "seconds": s}``."""
        started = time.perf_counter()
        masks: dict[str, np.ndarray] = {}
        with _left_as_it_was(model, self.presence):
            model.encode_image = cached_encoder(
                model.encode_image, self._features, {"encoded": 0, "reused": 0}
            )
            try:
                for names in self._groups():
                    masks.update(self._segment(model, names))
            finally:
                del model.encode_image
        dice = {n: round(metrics.dice(masks[n], self.references[n]), 4) for n in self.names}
        extents = [extent_errors(masks[n], self.references[n]) for n in self.names]
        return {
            "score": round(float(np.mean(list(dice.values()))), 4),
            "dice": dice,
            "ends_within_2": round(float(np.mean([ends_within(e) for e in extents])), 3),
            "seconds": round(time.perf_counter() - started, 1),
        }

    def _groups(self) -> list[list[str]]:
        """The structures segmented together: those sharing a window, the small ones apart (as evaluated)."""
        return [
            g
            for members in (self.volume.structures, self.volume.small)
            for g in self.volume.by_window(list(members))
        ]

    def _segment(self, model: SAM2Model, names: list[str]) -> dict[str, np.ndarray]:
        result = segment_volume(
            model,
            self.volume.image,
            largest_slice_prompts([self.references[n] for n in names]),
            spacing=self.volume.spacing,
            modality=self.volume.modality,
            window=self.volume.window(names[0]),
            **MEMORY_RUNS[METHOD],
        )
        return {n: result.probabilities[i] > 0.5 for i, n in enumerate(names, start=1)}


def presence_tensors(weights: str | Path) -> dict[str, torch.Tensor]:
    """The presence head of trained medsam2-lite ``weights`` (``weight``, ``bias``)."""
    from ..checkpoint import read_state_dict

    state = read_state_dict(weights)
    head = {k.removeprefix("presence_head."): v for k, v in state.items() if k.startswith("presence_head.")}
    if set(head) != {"weight", "bias"}:
        raise ValueError(f"{weights} holds no presence head (presence_head.weight and .bias)")
    return head


@contextlib.contextmanager
def _left_as_it_was(model: SAM2Model, presence: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Within the block ``model`` carries the ``presence`` head (when given) and is in eval mode; after it,
    its head, its modules' modes and the torch and numpy random states are as before."""
    modes = [m.training for m in model.modules()]
    numpy_state = np.random.get_state()
    head = model.presence_head if presence is not None else None
    kept = None if head is None else {k: v.detach().clone() for k, v in head.state_dict().items()}
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        try:
            if head is not None:
                head.load_state_dict({k: v.to(model.device) for k, v in presence.items()})
            model.eval()
            yield
        finally:
            if head is not None:
                head.load_state_dict(kept)
            for module, mode in zip(model.modules(), modes):
                module.training = mode
            np.random.set_state(numpy_state)
