"""Where an object ends (``medsam2.train.extent``): the predicted extent along the prompt axis against the
reference, and the presence head's per-slice precision and recall, alone and inside the held-out evaluation.

Extents are checked on hand-built masks whose errors are known; the presence figures on the tiny random-weight
model of the golden files, tracking a generated volume (its presence head is shifted to call every slice
present, so its precision is the share of slices that hold the object).
"""

from __future__ import annotations

import numpy as np
import pytest
from golden import box_tracking_model, generated_held_out_volume

from medsam2.preprocess import prepare_intensities
from medsam2.train import evaluate as ev
from medsam2.train import extent, report
from medsam2.train import heldout as ho

Z, Y, X = 8, 24, 32


@pytest.fixture(scope="module")
def model():
    return box_tracking_model()


@pytest.fixture(scope="module")
def volume() -> ho.HeldOutVolume:
    return generated_held_out_volume((Z, Y, X))


def _reference() -> np.ndarray:
    reference = np.zeros((Z, Y, X), bool)
    reference[1:7, 6:18, 8:24] = True
    return reference


def test_presence_precision_and_recall_count_slices():
    reference = _reference()  # present on slices 1..6
    scores = np.array([-1.0, 2.0, 3.0, -0.5, 1.0, 0.0, 4.0, 5.0])  # called present: 1, 2, 4, 6, 7
    counts = extent.presence_precision_recall(scores, reference)
    assert counts == {
        "precision": 4 / 5,
        "recall": 4 / 6,
        "slices_called_present": 5,
        "slices_present": 6,
        "slices_both": 4,
    }
    assert extent.presence_precision_recall(np.full(Z, -1.0), reference)["precision"] == 1.0


def test_pooled_presence_weighs_every_slice_once_and_the_mean_every_structure_once():
    reference = _reference()
    small = np.zeros((Z, Y, X), bool)
    small[3, 2:4, 2:4] = True  # one slice
    rows = [
        extent.presence_precision_recall(np.ones(Z), reference),  # 6 of 8 called slices right
        extent.presence_precision_recall(np.ones(Z), small),  # 1 of 8
    ]
    pooled = extent.pooled_presence(rows)
    assert pooled["structures"] == 2
    assert pooled["mean_precision"] == pytest.approx((6 / 8 + 1 / 8) / 2, abs=1e-4)
    assert pooled["pooled_precision"] == pytest.approx(7 / 16, abs=1e-4)
    assert pooled["mean_recall"] == pooled["pooled_recall"] == 1.0
    assert extent.pooled_presence([]) == {}


def test_presence_scores_are_the_tracked_object_scores_of_every_slice(model, volume):
    from medsam2.session import Session

    intensities = prepare_intensities(volume.image, modality="ct")
    start, box = ev.box_on_largest_slice(volume.mask("organ"))
    scores = extent.presence_scores(model, intensities, start, box)
    assert scores.shape == (Z,) and np.isfinite(scores).all()
    session = Session(model, intensities)
    session.add_prompt(start, box=box)
    for _ in session.propagate_low_res(start):
        pass
    forward = session.tracks[1].tracked
    assert [scores[z] for z in sorted(forward)] == [forward[z].object_score for z in sorted(forward)]


def test_the_evaluation_reports_the_presence_head_per_structure_and_overall(model, volume):
    result = ev.evaluate_volume(model, volume, log=lambda message: None, presence=True)
    found = result["presence"]["organ"]
    reference = volume.mask("organ")
    start, box = ev.box_on_largest_slice(reference)
    scores = extent.presence_scores(model, prepare_intensities(volume.image, modality="ct"), start, box)
    np.testing.assert_allclose(found["object_scores"], scores, atol=1e-3)
    assert found == {
        **extent.presence_precision_recall(scores, reference),
        "object_scores": found["object_scores"],
    }
    # The shifted presence head calls every slice present: precision is the share of slices with the organ.
    present = int(reference.any(axis=(1, 2)).sum())
    assert (scores > 0).all() and present < Z
    assert found["precision"] == present / Z and found["recall"] == 1.0
    assert result["seconds"][ev.PRESENCE] > 0

    results = {"volumes": {"generated": result}}
    results["summary"] = ev.summarize(results)
    presence = results["summary"]["presence"]
    assert presence["all"] == presence["by_volume"]["generated"] == extent.pooled_presence([found])
    table = report.markdown(results)
    assert f"| generated | 1 | {present / Z:.3f} | 1.000 | {present / Z:.3f} | 1.000 |" in table
    assert "| **all** | 1 |" in table
    quiet = ev.evaluate_volume(model, volume, log=lambda message: None)
    assert "presence" not in quiet and ev.PRESENCE not in quiet["seconds"]
    assert "presence" not in ev.summarize({"volumes": {"generated": quiet}})


def test_the_evaluate_command_measures_presence_when_asked():
    from medsam2.train import build_parser

    parser = build_parser()
    assert parser.parse_args(["evaluate"]).presence is False
    assert parser.parse_args(["evaluate", "--presence"]).presence is True
