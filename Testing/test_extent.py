"""Where an object ends (``medsam2.train.extent``): the predicted extent along the prompt axis against the
reference, and the presence head's per-slice precision and recall, alone and inside the held-out evaluation.

Extents are checked on hand-built masks whose errors are known; the presence figures on the tiny random-weight
model of the golden files, tracking a generated volume (its presence head is shifted to call every slice
present, so its precision is the share of slices that hold the object).
"""

from __future__ import annotations

import numpy as np
import pytest
from heldout_fixtures import X, Y, Z, box_reference

from medsam2.preprocess import prepare_intensities
from medsam2.train import evaluate as ev
from medsam2.train import extent, report
from medsam2.train import heldout as ho


def test_presence_precision_and_recall_count_slices():
    reference = box_reference()  # present on slices 1..6
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
    reference = box_reference()
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


def _slices(first: int, last: int) -> np.ndarray:
    mask = np.zeros((Z + 2, 6, 6), bool)
    mask[first : last + 1, 2:4, 1:5] = True
    return mask


def test_the_extent_error_is_counted_in_slices_at_each_end():
    reference = _slices(2, 5)
    longer = _slices(1, 7)
    longer[4] = False  # a gap inside changes nothing at the ends
    assert extent.axial_extent(reference) == (2, 5)
    errors = extent.extent_errors(longer, reference)
    assert errors == {"first": 1, "last": 7, "first_error": -1, "last_error": 2}
    assert extent.ends_within(errors) and not extent.ends_within(errors, slices=1)
    late = extent.extent_errors(_slices(3, 8), reference)
    assert (late["first_error"], late["last_error"]) == (1, 3) and not extent.ends_within(late)
    empty = extent.extent_errors(np.zeros_like(reference), reference)
    assert empty["first"] is None and not extent.ends_within(empty)
    with pytest.raises(ValueError, match="reference holds no object"):
        extent.extent_errors(reference, np.zeros_like(reference))


def test_small_structures_are_summarized_apart_with_the_share_ending_within_two_slices():
    reference = _slices(2, 5)
    within, beyond = _slices(1, 7), _slices(2, 9)  # ends off by (-1, +2) and (0, +4)

    def row(prediction, dice):
        return {
            m: {"dice": dice, "hd95_mm": 3.0, "extent": extent.extent_errors(prediction, reference)}
            for m in ev.METHODS
        }

    references = {n: {"ml": 0.5, "first": 2, "last": 5} for n in ("organ", "a", "b", "c")}
    results = {
        "volumes": {
            "V": {
                "scores": {"organ": row(reference, 0.9)},
                "small_scores": {"a": row(within, 0.6), "b": row(beyond, 0.3), "c": row(reference, 0.6)},
                "references": references,
                "seconds": {m: 1.0 for m in ev.METHODS},
            }
        }
    }
    summary = ev.summarize(results)
    assert summary["mean_dice"][ev.METHODS[0]] == 0.9  # the small ones stay out of the main mean
    assert summary["ends_within"][ev.METHODS[0]] == 1.0
    small = summary["small"]
    assert small["structures"] == 3 and small["mean_dice"][ev.METHODS[0]] == 0.5
    assert small["ends_within"][ev.METHODS[0]] == pytest.approx(2 / 3, abs=1e-4)
    results["summary"] = summary
    table = report.markdown(results)
    assert "| V | b | 0.50 | 2-5 | 0.300 / 3.0 |" in table
    assert "| **mean Dice, 3 small structures** | | | | **0.500** |" in table
    assert "| V | a | 2-5 | 1-7 (-1 / +2) |" in table and "| V | b | 2-5 | 2-9 (+0 / +4) |" in table
    assert "| **small structures: ends within 2 slices at both ends** | | | 67% |" in table


def test_a_small_structure_is_segmented_apart_and_gets_its_extent_and_volume(model, volume):
    nodule = np.zeros((Z, Y, X), bool)
    nodule[3:6, 10:14, 12:17] = True
    with_small = ho.HeldOutVolume(
        volume.name, volume.image, volume.spacing, "ct", volume.labels, volume.structures, {"nodule": nodule}
    )
    alone = ev.evaluate_volume(model, volume, log=lambda message: None)
    result = ev.evaluate_volume(model, with_small, log=lambda message: None, presence=True)
    assert result["scores"] == alone["scores"]  # the structures are segmented as without it
    assert set(result["presence"]) == {"organ", "nodule"}
    assert result["references"]["nodule"] == {"ml": nodule.sum() * 2.0 / 1000, "first": 3, "last": 5}
    scores = result["small_scores"]["nodule"]
    assert list(scores) == list(ev.METHODS)
    # (v) prompts only the reference's slices: its extent cannot reach past the reference's ends.
    bounded = scores[ev.METHODS[4]]["extent"]
    assert bounded["first"] is None or (bounded["first_error"] >= 0 and bounded["last_error"] <= 0)
    for method, s in scores.items():
        e = s["extent"]
        if e["first"] is not None:
            assert (e["first_error"], e["last_error"]) == (e["first"] - 3, e["last"] - 5), method
    summary = ev.summarize({"volumes": {"generated": result}})
    assert summary["small"]["ends_within"] == {
        m: float(extent.ends_within(scores[m]["extent"])) for m in ev.METHODS
    }
    assert summary["presence"]["small"] == extent.pooled_presence([result["presence"]["nodule"]])
    assert summary["presence"]["all"] == extent.pooled_presence([result["presence"]["organ"]])


def test_six_orientations_against_two_counts_what_the_further_axes_removed_and_added():
    """(iii) is (i)'s first pass, so the voxels where their masks differ are the further axes' doing."""
    from medsam2.train.orientations import extra_axes_effect

    reference = np.zeros((4, 6, 6), bool)
    reference[1:3, 1:5, 1:5] = True  # 32 voxels
    two = np.zeros_like(reference)
    two[1:4, 1:5, 1:5] = True  # the reference and 16 false voxels on slice 3
    six = two.copy()
    six[3, 1:5, 1:3] = False  # 8 false removed
    six[1, 1, 1:5] = False  # 4 true removed
    six[0, 0, 0] = True  # 1 false added
    assert extra_axes_effect(six, two, reference) == {
        "true_removed": 4,
        "false_removed": 8,
        "true_added": 0,
        "false_added": 1,
    }


def test_the_summary_splits_six_against_two_by_whether_the_first_pass_over_or_under_segments():
    reference = np.zeros((6, 4, 4), bool)
    reference[1:5, 1:3, 1:3] = True
    exact = extent.extent_errors(reference, reference)

    def scores(six, two, ratio):
        dice = dict(zip(ev.METHODS, (six, 0.5, two, 0.5, 0.9)))
        return {
            m: {"dice": d, "hd95_mm": 1.0, "volume_ratio": ratio, "extent": exact} for m, d in dice.items()
        }

    effect = {"true_removed": 5, "false_removed": 40, "true_added": 0, "false_added": 2}
    results = {
        "volumes": {
            "A": {
                "scores": {
                    "liver": scores(0.9, 0.8, 1.4),
                    "spine": scores(0.5, 0.6, 0.6),
                    "kidney": scores(0.7, 0.8, 0.9),
                },
                "extra_axes": {"liver": effect, "spine": effect, "kidney": effect},
                "references": {n: {"ml": 1.0, "first": 1, "last": 4} for n in ("liver", "spine", "kidney")},
                "seconds": {},
            }
        }
    }
    summary = ev.summarize(results)["extra_axes"]
    assert (summary["structures"], summary["better"], summary["worse"]) == (3, 1, 2)
    assert summary["mean_dice_change"] == pytest.approx(-1 / 30, abs=1e-4)
    assert summary["where_first_pass_over_segments"] == {
        "structures": 1,
        "mean_dice_change": pytest.approx(0.1),
    }
    assert summary["where_first_pass_under_segments"]["mean_dice_change"] == pytest.approx(-0.1)
    results["summary"] = ev.summarize(results)
    table = report.markdown(results)
    assert "| A | spine | 0.600 | 0.60 | 0.500 | 5 | 40 | 0 | 2 |" in table
    assert "better on 1, worse on 2" in table and "+0.1000 on 1 where the first pass over-segments" in table
    assert "extra_axes" not in ev.summarize({"volumes": {"A": {**results["volumes"]["A"], "extra_axes": {}}}})
