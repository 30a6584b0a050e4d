"""Running one group: read the image once, segment all its rows' structures together, write each row's output.

This is what a worker does for each task, and it needs no Ray: the benchmark runs the same function in one
process to measure what Ray adds. A row that cannot run (its prompt outside the image, an unreadable
reference) fails alone; a group that cannot run (the image unreadable, the model failing) fails all its rows.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import torch

from .. import io, metrics
from ..cli_inputs import open_model
from ..errors import MedSAM2Error
from ..memory import MemoryOptions
from ..model.sam2 import SAM2Model
from ..prompts import Prompt
from ..volume import segment_volume
from .plan import Group, ModelChoice
from .prompt import describe, engine_prompts
from .rows import RowSpec
from .store import OutputStore, RowRecord, failed_record


class Models:
    """The models of one worker, each loaded once on first use and kept."""

    def __init__(self, choice: ModelChoice, device: str) -> None:
        self.choice, self.device = choice, device
        self._loaded: dict[str, SAM2Model] = {}

    def get(self, source: str) -> SAM2Model:
        if source not in self._loaded:
            self._loaded[source] = open_model(source, self.choice.config, self.choice.image_size, self.device)
        return self._loaded[source]


@dataclass
class _Ready:
    """A row whose inputs are checked: its object id, prompts and reference mask."""

    row: RowSpec
    hash: str
    obj_id: int
    prompts: list[Prompt]
    reference: np.ndarray | None


def run_group(
    group: Group, models: Models, store: OutputStore, device: str, skip: Collection[str] = ()
) -> list[RowRecord]:
    """Segment ``group`` and write the outputs of its rows except those in ``skip`` (rows finished earlier:
    they are still segmented, since every row of the group shapes the others' results, but not written).
    Returns a record for each written row."""
    started = time.perf_counter()
    todo = [(r, h) for r, h in zip(group.rows, group.hashes) if r.id not in skip]
    try:
        image = io.read_image(group.image)
    except (MedSAM2Error, OSError) as error:
        return [_failed(row, hash_, error) for row, hash_ in todo]
    ready, records = [], {}
    for obj_id, (row, hash_) in enumerate(zip(group.rows, group.hashes), start=1):
        try:
            prompts = engine_prompts(row.prompt, image, obj_id)
            ready.append(_Ready(row, hash_, obj_id, prompts, _reference(row, image)))
        except (MedSAM2Error, OSError) as error:
            records[row.id] = _failed(row, hash_, error)
    if ready:
        try:
            results = _segment(group, ready, image, models)
        except Exception as error:  # whatever the engine raised (CUDA out of memory, say), other groups go on
            results = None
            for item in ready:
                records[item.row.id] = _failed(item.row, item.hash, error)
        if results is not None:
            share = (time.perf_counter() - started) / len(ready)
            for item in ready:
                if item.row.id not in skip:
                    records[item.row.id] = _finish(item, results[item.obj_id], image, store, device, share)
    return [records[row.id] for row, _ in todo]


def _reference(row: RowSpec, image: io.Image) -> np.ndarray | None:
    if row.reference is None:
        return None
    values = io.read_labels(row.reference, reference=image).array
    mask = values != 0 if row.reference_label is None else values == row.reference_label
    if not mask.any():
        which = "non-zero voxel" if row.reference_label is None else f"voxel of label {row.reference_label}"
        raise MedSAM2Error(f"The reference {row.reference} has no {which}")
    return mask


def _segment(group: Group, ready: list[_Ready], image: io.Image, models: Models) -> dict[int, np.ndarray]:
    settings = group.settings
    result = segment_volume(
        models.get(settings.model),
        image.array,
        [p for item in ready for p in item.prompts],
        spacing=image.spacing_zyx,
        modality=settings.modality,
        window=settings.window,
        orientations=settings.orientations,
        memory=MemoryOptions(policy=settings.memory),
        seed=settings.seed,
    )
    # Each row gets its own object's mask: structures of one image may overlap (a lesion inside an organ).
    return {item.obj_id: result.probabilities[item.obj_id] > 0.5 for item in ready}


def _finish(
    item: _Ready, mask: np.ndarray, image: io.Image, store: OutputStore, device: str, seconds: float
) -> RowRecord:
    row = item.row
    path = store.segmentation(row.id)
    try:
        io.write_labels(mask.astype(np.uint8), image, path, names={1: row.structure})
    except (MedSAM2Error, OSError) as error:
        return _failed(row, item.hash, error)
    record = RowRecord(
        id=row.id,
        structure=row.structure,
        image=row.image,
        status="ok",
        params_hash=item.hash,
        output=path.name,
        volume_ml=float(mask.sum()) * float(np.prod(image.spacing)) / 1000.0,
        seconds=seconds,
        device=device,
        prompt=describe(item.prompts),
    )
    if item.reference is not None:
        record.dice = metrics.dice(mask, item.reference)
        distance = metrics.hd95(mask, item.reference, spacing=image.spacing_zyx)
        record.hd95 = None if np.isinf(distance) else distance
    return record


def _failed(row: RowSpec, hash_: str, error: BaseException) -> RowRecord:
    message = str(error).strip() or type(error).__name__
    if not isinstance(error, (MedSAM2Error, OSError)):  # not one of ours: its type says what happened
        message = f"{type(error).__name__}: {message}"
    return failed_record(row, hash_, message)


def device_name(device: str) -> str:
    """``device`` as the results table shows it: ``cpu``, or ``cuda`` with the GPU's name."""
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device
