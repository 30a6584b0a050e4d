"""A simulated user who corrects: Dice after k corrections, as interactive tools are judged.

After the first run of a method on a structure, the user looks for the axial slice where the result is most
wrong (most voxels differ from the reference), draws that slice exactly as the reference has it, and runs
again; :func:`correction_curve` repeats this ``k`` times. A corrected slice keeps what was drawn, whatever
the model says there, as the Slicer module writes a correction back verbatim (``prepare_correction``).

How a correction re-runs each method of :mod:`medsam2.train.evaluate`:

- (i)-(iii), :func:`memory_segmenter`: each corrected slice becomes a mask prompt, or, corrected to empty,
  a prompt that the object is absent there (tracking does not carry it across that slice); the first box is
  kept unless its slice was corrected, and ``segment_volume`` runs again with the method's options. This is
  what ``MedSAM2SlicerLib.logic.prepare_correction`` asks of the engine.
- (iv), :func:`box_chain_segmenter`: every corrected slice where the object is present restarts the box
  chain from the box of the drawn mask, in both directions; each chain, the first box's included, ends
  before the next corrected slice (or where it loses the object, as before), so the slices between two
  starts get the union of both chains' masks. A slice corrected to empty starts no chain and ends the
  chains that reach it: the user has said the object is not there.

Each structure is segmented on its own here (the main table segments a volume's structures of one window
together), so the Dice after 0 corrections can differ slightly from that table's.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import numpy as np

from .. import metrics
from ..demo import box_on_largest_slice
from ..model.sam2 import SAM2Model
from ..preprocess import prepare_intensities
from ..prompts import Prompt
from ..volume import segment_volume
from .evaluate import MEMORY_RUNS, METHODS, AxialSlices, previous_box_chain, shared_encoder
from .heldout import HeldOutVolume

CORRECTED_METHODS = METHODS[:4]
REPORTED_CORRECTIONS = (0, 1, 3, 5)
TARGET_DICE = 0.85

# corrected axial slices (index -> the reference's mask ``[Y, X]`` there) -> the method's mask ``[Z, Y, X]``
Segmenter = Callable[[dict[int, np.ndarray]], np.ndarray]


def worst_slice(prediction: np.ndarray, reference: np.ndarray, corrected: Collection[int] = ()) -> int | None:
    """The axial slice of ``[Z, Y, X]`` masks with the most voxels that differ (the lowest index of equals),
    leaving out the ``corrected`` ones; ``None`` when no other slice differs."""
    errors = (prediction != reference).sum(axis=(1, 2))
    errors[list(corrected)] = 0
    worst = int(np.argmax(errors))
    return worst if errors[worst] > 0 else None


def correction_curve(segment: Segmenter, reference: np.ndarray, k: int) -> list[float]:
    """3D Dice after 0, 1, ..., ``k`` corrections (``k + 1`` values); once nothing is left to correct, the
    last value repeats."""
    corrections: dict[int, np.ndarray] = {}
    prediction = segment(corrections)
    curve = [metrics.dice(prediction, reference)]
    for _ in range(k):
        z = worst_slice(prediction, reference, corrections)
        if z is not None:
            corrections[z] = reference[z].copy()
            prediction = np.array(segment(dict(corrections)), dtype=bool)
            for index, drawn in corrections.items():
                prediction[index] = drawn
        curve.append(metrics.dice(prediction, reference))
    return curve


def corrections_to_reach(curve: list[float], target: float = TARGET_DICE) -> int:
    """The fewest corrections after which ``curve`` reaches ``target``; ``len(curve)`` (one more than the
    corrections tried) when it never does."""
    return next((i for i, d in enumerate(curve) if d >= target), len(curve))


def memory_segmenter(
    model: SAM2Model, volume: HeldOutVolume, prompt: Prompt, window: str | None, options: dict
) -> Segmenter:
    """Methods (i)-(iii) (``options``: their ``segment_volume`` options) from ``prompt`` and the corrections
    as mask prompts (see the module docstring)."""

    def segment(corrections: dict[int, np.ndarray]) -> np.ndarray:
        prompts = [prompt] if prompt.index not in corrections else []
        prompts += [
            Prompt(axis=0, index=z, obj_id=prompt.obj_id, mask=m)
            if m.any()
            else Prompt(axis=0, index=z, obj_id=prompt.obj_id, absent=True)
            for z, m in sorted(corrections.items())
        ]
        result = segment_volume(
            model,
            volume.image,
            prompts,
            spacing=volume.spacing,
            modality=volume.modality,
            window=window,
            **options,
        )
        return result.probabilities[prompt.obj_id] > 0.5

    return segment


def box_chain_segmenter(slices: AxialSlices, index: int, box: tuple[int, int, int, int]) -> Segmenter:
    """Method (iv) from the box on slice ``index``, each correction restarting the chain (module docstring)."""

    def segment(corrections: dict[int, np.ndarray]) -> np.ndarray:
        starts = {z: _box(m) for z, m in corrections.items() if m.any()}
        if index not in corrections:
            starts[index] = box
        ends = set(corrections) | set(starts)
        result = np.zeros((len(slices.stack), slices.stack.height, slices.stack.width), bool)
        for z, start_box in starts.items():
            result |= previous_box_chain(slices, z, start_box, stops=ends - {z})
        return result

    return segment


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def volume_corrections(
    model: SAM2Model,
    baseline: SAM2Model,
    volume: HeldOutVolume,
    k: int,
    log=print,
    names: Collection[str] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Dice after 0..``k`` corrections per structure of ``volume`` (or only ``names``, e.g. its small ones)
    and method (i)-(iv); ``baseline`` runs (iv)."""
    out: dict[str, dict[str, list[float]]] = {}
    slices_by_window: dict[str | None, AxialSlices] = {}
    with shared_encoder(model, baseline):
        for name in volume.structures if names is None else names:
            reference = volume.mask(name)
            index, box = box_on_largest_slice(reference)
            window = volume.window(name)
            if window not in slices_by_window:
                intensities = prepare_intensities(volume.image, modality=volume.modality, window=window)
                slices_by_window[window] = AxialSlices(baseline, intensities)
            prompt = Prompt(axis=0, index=index, box=box)
            segmenters = {
                m: memory_segmenter(model, volume, prompt, window, MEMORY_RUNS[m]) for m in MEMORY_RUNS
            }
            segmenters[METHODS[3]] = box_chain_segmenter(slices_by_window[window], index, box)
            out[name] = {}
            for method, segment in segmenters.items():
                out[name][method] = [round(d, 4) for d in correction_curve(segment, reference, k)]
                # The whole curve, so that a run stopped before it writes its JSON still leaves its figures.
                curve = " ".join(f"{d:.3f}" for d in out[name][method])
                log(f"  {volume.name}: {name}, {method}: Dice after 0..{k} corrections: {curve}")
    return out


def summarize_corrections(volumes: dict[str, dict], key: str = "corrections") -> dict:
    """Mean Dice after 0, 1, 3 and 5 corrections (those run) per method, and the corrections needed to reach
    :data:`TARGET_DICE`: per structure, their mean, and how many structures never reached it. ``key``: the
    volumes' curves to summarize (``corrections``, or ``small_corrections`` for the small structures)."""
    curves = {m: [c[m] for v in volumes.values() for c in v.get(key, {}).values()] for m in CORRECTED_METHODS}
    if not any(curves.values()):
        return {}
    tried = min(len(c) for c in curves[METHODS[0]]) - 1
    needed = {
        m: {
            f"{volume}: {name}": corrections_to_reach(c[m])
            for volume, v in volumes.items()
            for name, c in v.get(key, {}).items()
        }
        for m in CORRECTED_METHODS
    }
    return {
        "corrections_tried": tried,
        "structures": len(curves[METHODS[0]]),
        "mean_dice_after": {
            m: {
                str(n): round(float(np.mean([c[n] for c in curves[m]])), 4)
                for n in REPORTED_CORRECTIONS
                if n <= tried
            }
            for m in CORRECTED_METHODS
        },
        "to_reach_target": {
            m: {
                "target_dice": TARGET_DICE,
                "mean": round(float(np.mean(list(needed[m].values()))), 2),
                "never": sum(n > tried for n in needed[m].values()),
                "per_structure": needed[m],
            }
            for m in CORRECTED_METHODS
        },
    }


def corrections_markdown(summary: dict, what: str = "structures") -> str:
    """The table of mean Dice after k corrections and corrections to reach the target, per method; ``what``
    names the structures in the title."""
    if not summary:
        return ""
    tried = summary["corrections_tried"]
    steps = list(summary["mean_dice_after"][METHODS[0]])
    lines = [
        f"Simulated user correcting the worst axial slice with the reference (up to {tried} corrections,"
        f" {summary['structures']} {what}):",
        "",
        "| method | "
        + " | ".join(f"Dice after {n}" for n in steps)
        + f" | corrections to Dice {TARGET_DICE} |",
        "|---|" + "---|" * (len(steps) + 1),
    ]
    for m in CORRECTED_METHODS:
        reach = summary["to_reach_target"][m]
        never = f" ({reach['never']} never within {tried}, counted {tried + 1})" if reach["never"] else ""
        cells = [f"{summary['mean_dice_after'][m][n]:.3f}" for n in steps]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {reach['mean']:.1f}{never} |")
    return "\n".join(lines) + "\n"
