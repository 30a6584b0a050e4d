"""Where an object starts and ends along the prompt axis: a result's axial extent against the reference's,
and the presence head's own per-slice answer, "is the object on this slice?".

Both judge the same thing, the failure of issue 17: a propagation that keeps "finding" the object after it
has ended. The extent is measured on each method's final mask (:func:`extent_errors`); the presence head is
measured on its own (:func:`presence_scores`), with nothing stopping the propagation, so that its precision
and recall say what stopping on it would give.
"""

from __future__ import annotations

import numpy as np

from ..model.sam2 import SAM2Model

ENDS_WITHIN_SLICES = 2


def axial_extent(mask: np.ndarray) -> tuple[int, int] | None:
    """The first and last axial slice of ``mask`` ``[Z, Y, X]`` holding any voxel; ``None`` when empty."""
    present = np.nonzero(np.asarray(mask).any(axis=(1, 2)))[0]
    return (int(present[0]), int(present[-1])) if len(present) else None


def extent_errors(prediction: np.ndarray, reference: np.ndarray) -> dict[str, int | None]:
    """The predicted first / last axial slice and its signed error in slices against ``reference`` at each
    end (``first_error`` < 0: starts before the reference; ``last_error`` > 0: runs on past it); all
    ``None`` when the prediction is empty. ``reference`` must hold the object."""
    expected = axial_extent(reference)
    if expected is None:
        raise ValueError("the reference holds no object: its extent is undefined")
    found = axial_extent(prediction)
    if found is None:
        return {"first": None, "last": None, "first_error": None, "last_error": None}
    return {
        "first": found[0],
        "last": found[1],
        "first_error": found[0] - expected[0],
        "last_error": found[1] - expected[1],
    }


def ends_within(errors: dict[str, int | None], slices: int = ENDS_WITHIN_SLICES) -> bool:
    """Whether both ends of an :func:`extent_errors` result are within ``slices`` of the reference's."""
    if errors["first_error"] is None:
        return False
    return abs(errors["first_error"]) <= slices and abs(errors["last_error"]) <= slices


# ------------------------------------------------------------------ the presence head on its own


def presence_scores(
    model: SAM2Model, intensities: np.ndarray, index: int, box: tuple[int, ...]
) -> np.ndarray:
    """The object score (presence logit) on every axial slice of prepared ``intensities`` ``[Z, Y, X]``, the
    object prompted by ``box`` on slice ``index`` and tracked through every slice in both directions with
    nothing stopping early: ``[Z]`` float."""
    from ..session import Session

    session = Session(model, intensities)
    session.add_prompt(index, box=box)
    for reverse in (False, True):
        for _ in session.propagate_low_res(index, reverse=reverse):
            pass
    track = session.tracks[1]
    return np.array(
        [{**track.tracked, **track.conditioning}[z].object_score for z in range(len(intensities))]
    )


def presence_precision_recall(scores: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Per-slice precision and recall of "object present" (``scores`` ``[Z]`` > 0) against the slices where
    ``reference`` ``[Z, Y, X]`` holds the object; precision is 1.0 when no slice is called present. The
    slice counts are kept for pooling (:func:`pooled_presence`)."""
    called, present = np.asarray(scores) > 0, reference.any(axis=(1, 2))
    hits = int((called & present).sum())
    return {
        "precision": hits / int(called.sum()) if called.any() else 1.0,
        "recall": hits / int(present.sum()) if present.any() else 1.0,
        "slices_called_present": int(called.sum()),
        "slices_present": int(present.sum()),
        "slices_both": hits,
    }


def pooled_presence(rows: list[dict]) -> dict[str, float]:
    """Mean precision and recall over structures (:func:`presence_precision_recall` results), and both
    pooled over all their slices (every slice of every structure counts once)."""
    if not rows:
        return {}
    called = sum(r["slices_called_present"] for r in rows)
    present = sum(r["slices_present"] for r in rows)
    both = sum(r["slices_both"] for r in rows)
    return {
        "structures": len(rows),
        "mean_precision": round(float(np.mean([r["precision"] for r in rows])), 4),
        "mean_recall": round(float(np.mean([r["recall"] for r in rows])), 4),
        "pooled_precision": round(both / called, 4) if called else 1.0,
        "pooled_recall": round(both / present, 4) if present else 1.0,
    }
