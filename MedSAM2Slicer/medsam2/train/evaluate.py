"""Held-out evaluation of ``medsam2-lite``: real volumes and structures that training never saw.

The volumes and their structures: :mod:`.heldout`. For each structure the prompt is the reference's box on the
axial slice where it is largest, and the whole volume is segmented, in the CT window the structure is read in
(lungs in the lung window, vertebrae in the bone window, heart and vessels in the mediastinum window,
abdominal organs in the abdomen window; MR by percentiles), by

(i) ``segment_volume``, self-sorting memory, 6 orientations; (ii) the same with SAM 2's ``"recent"`` memory;
(iii) self-sorting, 2 orientations (the prompt axis, both directions); (iv) no memory: LiteMedSAM slice by
slice from the prompt slice outwards, each slice prompted with the previous slice's box grown by the model's
``tracking_box_margin`` (the box the tracked model gets), until a slice comes back empty; (v) LiteMedSAM with
the reference box on every slice where the structure is present (an upper bound no method can use). (iv) and
(v) run LiteMedSAM itself (:func:`medsam2.lite.litemedsam_model`), without the object-score token that
medsam2-lite's decoder adds.

The 2D one-prompt setting (:mod:`.one_prompt`): a box on the CT slice where a structure is largest is the
only prompt; ``segment_images`` then segments that structure in other CT slices and in MR slices (another
volume and modality). Baseline: the template's box, scaled, on every image, without memory.

The structures of a volume that share a window are segmented together (several objects in one call), and
every method gets the same prepared intensities.

The small structures (:data:`.heldout.SMALL_STRUCTURES`, under 10 ml) are segmented the same way, apart from
the others, and reported apart, so that the means over the others stay comparable with earlier tables. For
every structure the result's axial extent is compared with the reference's (:mod:`.extent`): the error in
slices at each end, and the share of structures ending within 2 slices of the reference at both ends.

With ``presence``, the presence head is also judged on its own (:mod:`.extent`): from the same prompt, the
object score on every axial slice of a both-ways propagation that nothing stops, and its per-slice precision
and recall of "object present" against the reference's slices.

(iii) is (i)'s first pass, so every volume also reports, per structure, the voxels that (i)'s further axes
removed from (iii)'s mask and added to it, true and false (:mod:`.orientations`).

Synthetic lesions written into the chest CT (:func:`.heldout.synthetic_lesion_volume`) are one more part,
segmented as a volume's structures are, reported apart (``synthetic_lesions``) with their own means.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import numpy as np
import torch

from .. import metrics
from ..demo import box_on_largest_slice
from ..frames import FrameStack
from ..memory import MemoryOptions
from ..model.sam2 import ImageFeatures, SAM2Model
from ..preprocess import prepare_intensities
from ..prompts import Prompt
from ..volume import segment_volume
from .extent import (
    axial_extent,
    ends_within,
    extent_errors,
    pooled_presence,
    presence_precision_recall,
    presence_scores,
)
from .heldout import (
    HELD_OUT_VOLUMES,
    ONE_PROMPT_VOLUMES,
    SYNTHETIC_LESION_VOLUME,
    HeldOutVolume,
    held_out_names,
    held_out_volumes,
    synthetic_lesion_volume,
)

METHODS = (
    "(i) self-sorting, 6 orientations",
    "(ii) recent, 6 orientations",
    "(iii) self-sorting, 2 orientations",
    "(iv) no memory, previous box",
    "(v) reference box every slice",
)

# The presence head on its own, timed with the methods (:mod:`.extent`).
PRESENCE = "presence"

# The simulated user's corrections of a volume's structures and of its small ones (:mod:`.corrections`).
CORRECTION_KEYS = ("corrections", "small_corrections")

# Where the synthetic lesions' figures go in the results (not among the volumes, whose means they would move).
LESIONS_KEY = "synthetic_lesions"

# The options of segment_volume that make methods (i)-(iii).
MEMORY_RUNS = {
    METHODS[0]: dict(orientations=6, memory=MemoryOptions(policy="self-sorting")),
    METHODS[1]: dict(orientations=6, memory=MemoryOptions(policy="recent")),
    METHODS[2]: dict(orientations=2, memory=MemoryOptions(policy="self-sorting")),
}


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
def shared_encoder(*models: SAM2Model) -> Iterator[dict]:
    """Within the block each distinct input image is encoded once (methods (i)-(iii) visit the same slices),
    and once for all ``models`` whose image encoders hold equal weights (``medsam2-lite`` and LiteMedSAM, the
    baseline of (iv) and (v), share LiteMedSAM's frozen encoder); yields ``{"encoded": n, "reused": n}``."""
    stats = {"encoded": 0, "reused": 0}
    caches: list[tuple[dict[str, torch.Tensor], dict[str, ImageFeatures]]] = []
    models = tuple(dict.fromkeys(models))  # the baseline may be the model itself
    for model in models:
        weights = model.image_encoder.state_dict()
        cache = next((c for w, c in caches if _equal_tensors(w, weights)), None)
        if cache is None:
            cache = {}
            caches.append((weights, cache))
        model.encode_image = cached_encoder(model.encode_image, cache, stats)
    try:
        yield stats
    finally:
        for model in models:
            del model.encode_image


def cached_encoder(
    encode: Callable[[torch.Tensor], ImageFeatures], cache: dict[str, ImageFeatures], stats: dict[str, int]
) -> Callable[[torch.Tensor], ImageFeatures]:
    """``encode`` answering from ``cache`` (keyed by the input's bytes and shape) when it can; counts the
    encodings and reuses in ``stats``."""

    def cached(images: torch.Tensor) -> ImageFeatures:
        key = hashlib.sha1(images.detach().cpu().numpy().tobytes()).hexdigest() + str(tuple(images.shape))
        if key in cache:
            stats["reused"] += 1
        else:
            stats["encoded"] += 1
            cache[key] = encode(images)
        return cache[key]

    return cached


def _equal_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def evaluate_volume(
    model: SAM2Model,
    volume: HeldOutVolume,
    baseline: SAM2Model | None = None,
    log=print,
    corrections: int = 0,
    presence: bool = False,
) -> dict:
    """Dice / HD95 and axial extent per structure and method, and seconds per method, for one held-out volume:
    ``scores`` for its structures, ``small_scores`` for its small ones (segmented apart from the others, so
    that those are segmented as before), ``references`` each reference's ml and axial extent.

    ``baseline``: the model of the no-memory methods (iv) and (v) (default: ``model``). ``corrections`` > 0
    adds the Dice of (i)-(iv) after 0..``corrections`` simulated corrections of the structures
    (``corrections``) and of the small ones (``small_corrections``; :mod:`.corrections`). ``presence`` adds
    the presence head's per-slice precision and recall per structure, small ones included (:mod:`.extent`)."""
    groups = {"scores": list(volume.structures), "small_scores": list(volume.small)}
    names = [n for group in groups.values() for n in group]
    references = {name: volume.mask(name) for name in names}
    masks: dict[str, dict[str, np.ndarray]] = {m: {} for m in METHODS}
    seconds = dict.fromkeys(METHODS, 0.0)
    found: dict[str, dict] | None = {} if presence else None
    encoder_stats = {"encoded": 0, "reused": 0}
    for group in groups.values():
        for together in volume.by_window(group):
            window = volume.window(together[0])
            stats = _evaluate_group(
                model, baseline or model, volume, together, window, references, masks, seconds, log, found
            )
            encoder_stats = {k: v + stats[k] for k, v in encoder_stats.items()}
    out = {
        "shape": list(volume.image.shape),
        "spacing_mm": list(volume.spacing),
        **{
            key: {n: _scores({m: masks[m][n] for m in METHODS}, references[n], volume.spacing) for n in group}
            for key, group in groups.items()
            if group
        },
        "references": {
            n: {"ml": round(float(references[n].sum() * np.prod(volume.spacing) / 1000), 2)}
            | dict(zip(("first", "last"), axial_extent(references[n])))
            for n in names
        },
        "seconds": {m: round(s, 1) for m, s in seconds.items()},
        "encoder": encoder_stats,
        "windows": {n: volume.window(n) for n in names},
    }
    if found is not None:
        out["presence"] = found
    from .orientations import extra_axes_effect

    out["extra_axes"] = {
        n: extra_axes_effect(masks[METHODS[0]][n], masks[METHODS[2]][n], references[n]) for n in names
    }
    if corrections:
        from .corrections import volume_corrections

        # One call for both groups, so that each slice is encoded once for all of them.
        curves = volume_corrections(model, baseline or model, volume, corrections, log, names=names)
        for key, group in zip(CORRECTION_KEYS, groups.values()):
            if group:
                out[key] = {n: curves[n] for n in group}
    return out


def largest_slice_prompts(references: list[np.ndarray]) -> list[Prompt]:
    """One prompt per reference mask ``[Z, Y, X]``, objects 1, 2, ...: its box on the axial slice where it is
    largest (the user of the evaluation)."""
    prompts = []
    for obj_id, reference in enumerate(references, start=1):
        index, box = box_on_largest_slice(reference)
        prompts.append(Prompt(axis=0, index=index, obj_id=obj_id, box=box))
    return prompts


def _scores(masks: dict[str, np.ndarray], reference: np.ndarray, spacing: tuple[float, ...]) -> dict:
    """Dice, HD95, volume ratio and axial extent (:func:`.extent.extent_errors`) of each method's mask."""
    return {
        method: {
            "dice": round(metrics.dice(mask, reference), 4),
            "hd95_mm": round(metrics.hd95(mask, reference, spacing), 2),
            "volume_ratio": round(float(mask.sum() / max(reference.sum(), 1)), 3),
            "extent": extent_errors(mask, reference),
        }
        for method, mask in masks.items()
    }


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
    prompts = largest_slice_prompts([references[n] for n in names])
    prepared = dict(spacing=volume.spacing, modality=volume.modality, window=window)
    intensities = prepare_intensities(volume.image, modality=volume.modality, window=window)
    slices = AxialSlices(baseline, intensities)
    with shared_encoder(model, baseline) as encoder_stats:
        for method, options in MEMORY_RUNS.items():
            started = time.perf_counter()
            result = segment_volume(model, volume.image, prompts, **prepared, **options)
            seconds[method] += time.perf_counter() - started
            masks[method].update({n: result.probabilities[i] > 0.5 for i, n in enumerate(names, start=1)})
            log(f"  {volume.name} ({window or volume.modality}): {method} in {seconds[method]:.0f} s")
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
            for p, n in zip(prompts, names):
                scores = presence_scores(model, intensities, p.index, tuple(p.box))
                presence[n] = {
                    **presence_precision_recall(scores, references[n]),
                    "object_scores": [round(float(s), 3) for s in scores],
                }
            seconds[PRESENCE] = seconds.get(PRESENCE, 0.0) + time.perf_counter() - started
            log(f"  {volume.name} ({window or volume.modality}): presence in {seconds[PRESENCE]:.0f} s")
    return dict(encoder_stats)


def summarize(results: dict) -> dict:
    """Mean Dice per method over every structure of every volume, and (i) minus (iv) per structure; the share
    of structures whose axial extent ends within :data:`.extent.ENDS_WITHIN_SLICES` slices of the reference
    at both ends; the same for the small structures on their own; the presence head's precision / recall."""
    volumes = results["volumes"]
    rows = [s for v in volumes.values() for s in v["scores"].values()]
    gain = {
        f"{volume}: {name}": round(s[METHODS[0]]["dice"] - s[METHODS[3]]["dice"], 4)
        for volume, v in volumes.items()
        for name, s in v["scores"].items()
    }
    summary = {
        "mean_dice": _mean_dice(rows),
        "mean_dice_by_volume": {
            volume: _mean_dice(list(v["scores"].values())) for volume, v in volumes.items()
        },
        "i_minus_iv": gain,
        "i_loses_on": [k for k, d in gain.items() if d < 0],
        "ends_within": _ends_within_share(rows),
    }
    small = {volume: v["small_scores"] for volume, v in volumes.items() if v.get("small_scores")}
    if small:
        small_rows = [s for v in small.values() for s in v.values()]
        summary["small"] = {
            "structures": len(small_rows),
            "mean_dice": _mean_dice(small_rows),
            "mean_dice_by_volume": {volume: _mean_dice(list(v.values())) for volume, v in small.items()},
            "ends_within": _ends_within_share(small_rows),
        }
    from .orientations import summarize_extra_axes

    extra_axes = summarize_extra_axes(volumes)
    if extra_axes:
        summary["extra_axes"] = extra_axes
    presence = {volume: v["presence"] for volume, v in volumes.items() if "presence" in v}
    if presence:
        by_volume = {volume: [p[n] for n in volumes[volume]["scores"]] for volume, p in presence.items()}
        summary["presence"] = {
            "by_volume": {volume: pooled_presence(rows) for volume, rows in by_volume.items()},
            "all": pooled_presence([r for rows in by_volume.values() for r in rows]),
        }
        if small:
            small_presence = [p[n] for volume, p in presence.items() for n in small.get(volume, {})]
            summary["presence"]["small"] = pooled_presence(small_presence)
    return summary


def _mean_dice(rows: list[dict]) -> dict[str, float]:
    return {m: round(float(np.mean([r[m]["dice"] for r in rows])), 4) for m in METHODS}


def _ends_within_share(rows: list[dict]) -> dict[str, float]:
    """Per method, the share of ``rows`` whose extent ends within the allowed slices at both ends."""
    return {m: round(float(np.mean([ends_within(r[m]["extent"]) for r in rows])), 4) for m in METHODS}


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
    """One volume's evaluation, the synthetic lesions' or the 2D one-prompt setting (a worker process's
    whole task)."""
    torch.set_num_threads(threads)
    model, baseline = load_models(weights, litemedsam)
    if job == ONE_PROMPT_JOB:
        started = time.perf_counter()
        from .one_prompt import one_prompt_2d

        volumes = held_out_volumes(data_dir, ONE_PROMPT_VOLUMES)
        return {"rows": one_prompt_2d(model, volumes, baseline), "seconds": time.perf_counter() - started}
    if job == SYNTHETIC_LESION_VOLUME:
        volume = synthetic_lesion_volume(data_dir)
    else:
        (volume,) = held_out_volumes(data_dir, [job])
    return evaluate_volume(model, volume, baseline, log=_progress, corrections=corrections, presence=presence)


def _progress(message: str) -> None:
    """A worker's progress line, on stderr: an evaluation can run for hours, and stdout carries its tables."""
    print(message, file=sys.stderr, flush=True)


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
    """The held-out evaluation of the trained ``weights`` (see the module docstring): every volume, the
    synthetic lesions and the 2D setting, or the ``only`` ones (volume names, :data:`ONE_PROMPT_JOB`).

    ``jobs`` > 1 evaluates the volumes (and the 2D setting) in that many processes of one thread each; the
    seconds per method are then those of a process sharing the machine. ``corrections`` > 0 adds the
    simulated user's corrections (:mod:`.corrections`); ``presence`` the presence head's per-slice precision
    and recall (:mod:`.extent`).
    """
    if corrections < 0:
        raise ValueError(f"corrections must be 0 (off) or more, got {corrections}")
    names = held_out_names(data_dir)
    if "TotalSegmentator chest CT" in names:
        names.append(SYNTHETIC_LESION_VOLUME)
    names.append(ONE_PROMPT_JOB)
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
    lesions = done.pop(SYNTHETIC_LESION_VOLUME, None)
    results = {"options": {"corrections": corrections, "presence": presence}, "volumes": done}
    if lesions is not None:
        results[LESIONS_KEY] = lesions
    if two_d is not None:
        results["one_prompt_2d"] = two_d["rows"]
        results["one_prompt_2d_seconds"] = round(two_d["seconds"], 1)
    return _with_summaries(results)


def _with_summaries(results: dict) -> dict:
    """``results`` with the summaries of its volumes' figures (:func:`summarize`, and the corrections')."""
    from .corrections import summarize_corrections

    results.pop("summary", None)
    for key in CORRECTION_KEYS:
        results.pop(key, None)
    if LESIONS_KEY in results:
        rows = list(results[LESIONS_KEY]["scores"].values())
        results[LESIONS_KEY]["summary"] = {
            "lesions": len(rows),
            "mean_dice": _mean_dice(rows),
            "ends_within": _ends_within_share(rows),
        }
    if results["volumes"]:
        results["summary"] = summarize(results)
        for key in CORRECTION_KEYS:
            corrections = summarize_corrections(results["volumes"], key)
            if corrections:
                results[key] = corrections
    return results


def merge_results(parts: list[dict]) -> dict:
    """One evaluation from JSON results of :func:`evaluate` run separately (e.g. one ``--only`` volume each,
    some with corrections): their volumes together, in the held-out order, summarized anew.

    Every part must have evaluated the same weights, no volume (nor the 2D setting) may be in two parts, and
    the parts with corrections must have tried as many. ``parts`` in the result records what each part ran.
    """
    if not parts:
        raise ValueError("no evaluation results to merge")
    weights = {str(p.get("weights")) for p in parts}
    if len(weights) > 1:
        raise ValueError(f"the parts evaluated different weights: {sorted(weights)}")
    tried = {p.get("options", {}).get("corrections", 0) for p in parts} - {0}
    if len(tried) > 1:
        raise ValueError(f"the parts tried different numbers of corrections: {sorted(tried)}")
    volumes: dict[str, dict] = {}
    for part in parts:
        for name, v in part["volumes"].items():
            if name in volumes:
                raise ValueError(f"{name!r} is in more than one part")
            volumes[name] = v
    two_d = [p for p in parts if "one_prompt_2d" in p]
    if len(two_d) > 1:
        raise ValueError(f"{ONE_PROMPT_JOB!r} is in more than one part")
    lesions = [p[LESIONS_KEY] for p in parts if LESIONS_KEY in p]
    if len(lesions) > 1:
        raise ValueError(f"{SYNTHETIC_LESION_VOLUME!r} is in more than one part")
    order = {name: i for i, name in enumerate(HELD_OUT_VOLUMES)}
    merged = {
        "weights": parts[0].get("weights"),
        "options": {
            "corrections": max(tried, default=0),
            "presence": all(p.get("options", {}).get("presence", False) for p in parts),
        },
        "parts": [
            {
                "volumes": list(p["volumes"])
                + ([SYNTHETIC_LESION_VOLUME] if LESIONS_KEY in p else [])
                + ([ONE_PROMPT_JOB] if "one_prompt_2d" in p else [])
            }
            | {"options": p.get("options", {})}
            for p in parts
        ],
        "volumes": dict(sorted(volumes.items(), key=lambda item: order.get(item[0], len(order)))),
    }
    if lesions:
        merged[LESIONS_KEY] = lesions[0]
    for part in two_d:
        merged["one_prompt_2d"] = part["one_prompt_2d"]
        merged["one_prompt_2d_seconds"] = part["one_prompt_2d_seconds"]
    return _with_summaries(merged)
