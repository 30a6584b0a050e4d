"""The simulated user who corrects (``medsam2.train.corrections``): which slice is corrected, what a
correction does to each method, the Dice after k corrections and the corrections needed to reach 0.85.

Stand-in segmenters (plain functions of the corrections) check the loop itself; the tiny random-weight model
of the golden files runs the real methods (i)-(iv) on a generated volume.
"""

from __future__ import annotations

import numpy as np
import pytest
from heldout_fixtures import X, Y, Z, box_reference

from medsam2 import metrics
from medsam2.preprocess import prepare_intensities
from medsam2.prompts import Prompt
from medsam2.train import corrections as cr
from medsam2.train import evaluate as ev
from medsam2.train import report


def _wrong(reference: np.ndarray, errors: dict[int, int]) -> np.ndarray:
    """``reference`` with ``errors[z]`` voxels flipped on slice z."""
    wrong = reference.copy()
    for z, n in errors.items():
        wrong[z].flat[:n] = ~wrong[z].flat[:n]
    return wrong


def test_the_worst_slice_is_the_one_with_most_differing_voxels_not_yet_corrected():
    reference = box_reference()
    prediction = _wrong(reference, {2: 5, 5: 40, 6: 12})
    assert cr.worst_slice(prediction, reference) == 5
    assert cr.worst_slice(prediction, reference, corrected=[5]) == 6
    assert cr.worst_slice(prediction, reference, corrected=[5, 6, 2]) is None
    assert cr.worst_slice(reference, reference) is None


def test_a_corrected_slice_holds_the_reference_exactly_whatever_the_method_answers():
    reference = box_reference()
    wrong = _wrong(reference, {1: 30, 4: 50, 6: 10})
    seen = []

    def stubborn(corrections):  # ignores every correction
        seen.append({z: m.copy() for z, m in corrections.items()})
        return wrong

    curve = cr.correction_curve(stubborn, reference, 2)
    assert [sorted(c) for c in seen] == [[], [4], [1, 4]]
    np.testing.assert_array_equal(seen[2][4], reference[4])
    np.testing.assert_array_equal(seen[2][1], reference[1])
    fixed = wrong.copy()
    fixed[4] = reference[4]
    assert curve[1] == metrics.dice(fixed, reference)
    fixed[1] = reference[1]
    assert curve[2] == metrics.dice(fixed, reference)


def test_dice_does_not_fall_for_an_oracle_like_segmenter_and_stays_once_nothing_is_left():
    reference = box_reference()
    errors = {z: 20 + 7 * z for z in range(Z)}

    def oracle(corrections):  # a correction also fixes the slices next to it
        fixed = {n for z in corrections for n in (z - 1, z, z + 1)}
        return _wrong(reference, {z: n for z, n in errors.items() if z not in fixed})

    curve = cr.correction_curve(oracle, reference, 6)
    assert len(curve) == 7
    assert all(b >= a for a, b in zip(curve, curve[1:]))
    assert curve[0] < 1.0 and curve[-1] == 1.0
    assert curve[-2] == curve[-1]  # nothing left to correct: the last value repeats


def test_corrections_to_reach_the_target_count_from_zero_and_cap_at_the_tries():
    assert cr.corrections_to_reach([0.9, 0.95]) == 0
    assert cr.corrections_to_reach([0.5, 0.8, 0.85, 0.9]) == 2
    never = [0.5] * 11  # 10 corrections tried
    assert cr.corrections_to_reach(never) == 11
    assert cr.corrections_to_reach([0.5, 0.84], target=0.8) == 1


def test_a_correction_restarts_the_box_chain_from_its_box_in_both_directions(model, volume):
    slices = ev.AxialSlices(model, prepare_intensities(volume.image, modality="ct"))
    reference = volume.mask("organ")
    start, box = ev.box_on_largest_slice(reference)
    segment = cr.box_chain_segmenter(slices, start, box)
    np.testing.assert_array_equal(segment({}), ev.previous_box_chain(slices, start, box))

    corrected = start + 2
    result = segment({corrected: reference[corrected]})
    from_prompt = ev.previous_box_chain(slices, start, box, stops={corrected})
    from_correction = ev.previous_box_chain(slices, corrected, cr._box(reference[corrected]), stops={start})
    assert not from_prompt[corrected:].any()  # the first chain ends before the corrected slice ...
    assert not from_correction[start].any()  # ... and the restarted one before the prompt's slice
    np.testing.assert_array_equal(result, from_prompt | from_correction)
    # A slice corrected to empty starts nothing and ends the chain there.
    erased = segment({corrected: np.zeros((Y, X), bool)})
    assert not erased[corrected:].any()
    np.testing.assert_array_equal(erased[:corrected], segment({})[:corrected])


def test_memory_methods_rerun_with_the_corrections_as_mask_or_absent_prompts(model, volume, monkeypatch):
    calls = []

    def recording(*args, **kwargs):
        calls.append(list(args[2]))
        return segment_volume(*args, **kwargs)

    segment_volume = cr.segment_volume
    monkeypatch.setattr(cr, "segment_volume", recording)
    reference = volume.mask("organ")
    start, box = ev.box_on_largest_slice(reference)
    prompt = Prompt(axis=0, index=start, box=box)
    segment = cr.memory_segmenter(model, volume, prompt, None, ev.MEMORY_RUNS[ev.METHODS[2]])
    empty = np.zeros((Y, X), bool)
    mask = segment({1: reference[1], start: reference[start], 7: empty})
    assert mask.shape == (Z, Y, X) and mask.dtype == bool
    # The box on a corrected slice gives way to the drawn mask; a slice drawn empty says the object is
    # not there, and the run does not carry it across that slice.
    assert [(p.index, p.box is None, p.absent) for p in calls[0]] == [
        (1, True, False),
        (start, True, False),
        (7, True, True),
    ]
    np.testing.assert_array_equal(calls[0][1].mask, reference[start])
    assert start < 7 and not mask[7:].any()
    segment({})
    assert [(p.index, p.box is not None) for p in calls[1]] == [(start, True)]


def test_evaluation_reports_dice_after_k_corrections_per_method(model, volume):
    logged = []
    result = ev.evaluate_volume(model, volume, log=logged.append, corrections=3)
    curves = result["corrections"]["organ"]
    assert list(curves) == list(cr.CORRECTED_METHODS)
    assert all(len(c) == 4 for c in curves.values())
    # The log keeps each whole curve, should the run stop before it writes its JSON.
    for method, curve in curves.items():
        line = f"generated: organ, {method}: Dice after 0..3 corrections: " + " ".join(
            f"{d:.3f}" for d in curve
        )
        assert any(entry.strip() == line for entry in logged), line
    results = {"volumes": {"generated": result}}
    summary = cr.summarize_corrections(results["volumes"])
    assert summary["corrections_tried"] == 3
    assert list(summary["mean_dice_after"][ev.METHODS[0]]) == ["0", "1", "3"]
    for method, curve in curves.items():
        needed = summary["to_reach_target"][method]
        assert needed["per_structure"] == {"generated: organ": cr.corrections_to_reach(curve)}
        assert needed["never"] == (cr.corrections_to_reach(curve) == 4)
    results["corrections"] = summary
    table = report.markdown(results)
    assert "Dice after 3" in table and "corrections to Dice 0.85" in table
    assert "corrections" not in ev.evaluate_volume(model, volume, log=lambda message: None)


def test_the_evaluate_command_takes_the_number_of_corrections_off_by_default(tmp_path):
    from medsam2.train import build_parser

    parser = build_parser()
    assert parser.parse_args(["evaluate"]).corrections == 0
    assert parser.parse_args(["evaluate", "--corrections", "5"]).corrections == 5
    with pytest.raises(ValueError, match="corrections"):
        ev.evaluate(tmp_path / "none.safetensors", tmp_path, only=["CTChest4"], corrections=-1)


def test_parts_run_separately_merge_into_one_evaluation_with_the_corrections_of_those_that_ran_them(
    model, volume, tmp_path, capsys
):
    import json

    from medsam2.train import main

    options = {"corrections": 0, "presence": False}
    plain = {
        "weights": "w.safetensors",
        "options": options,
        "volumes": {"TotalSegmentator CT": ev.evaluate_volume(model, volume, log=lambda message: None)},
    }
    corrected = {
        "weights": "w.safetensors",
        "options": {**options, "corrections": 2},
        "volumes": {"CTChest4": ev.evaluate_volume(model, volume, log=lambda message: None, corrections=2)},
    }
    merged = ev.merge_results([plain, corrected])
    assert list(merged["volumes"]) == ["CTChest4", "TotalSegmentator CT"]  # the held-out order
    both = {"volumes": {**corrected["volumes"], **plain["volumes"]}}
    assert merged["summary"] == ev.summarize(both)
    assert merged["corrections"] == cr.summarize_corrections(corrected["volumes"])
    assert merged["corrections"]["structures"] == 1 and merged["options"]["corrections"] == 2
    assert [p["volumes"] for p in merged["parts"]] == [["TotalSegmentator CT"], ["CTChest4"]]

    with pytest.raises(ValueError, match="more than one part"):
        ev.merge_results([corrected, corrected])
    with pytest.raises(ValueError, match="different weights"):
        ev.merge_results([plain, {**corrected, "weights": "other.safetensors"}])
    other_k = {**plain, "options": {**options, "corrections": 5}}
    with pytest.raises(ValueError, match="different numbers of corrections"):
        ev.merge_results([other_k, corrected])

    paths = []
    for i, part in enumerate((plain, corrected)):
        paths.append(tmp_path / f"part{i}.json")
        paths[-1].write_text(json.dumps(part))
    assert main(["report", *map(str, paths), "--out", str(tmp_path / "all.json")]) == 0
    assert json.loads((tmp_path / "all.json").read_text()) == json.loads(json.dumps(merged))
    table = (tmp_path / "all.md").read_text()
    assert table == report.markdown(merged) and "up to 2 corrections, 1 structures" in table
    assert table in capsys.readouterr().out
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(SystemExit, match="cannot read"):
        main(["report", str(tmp_path / "broken.json")])
    old = {"volumes": {"A": {"scores": {"liver": {m: {"dice": 0.5, "hd95_mm": 1.0} for m in ev.METHODS}}}}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(SystemExit, match="no 'extent'"):
        main(["report", str(tmp_path / "old.json")])


def test_a_worker_reports_its_progress_on_stderr_not_among_the_tables(capsys):
    """Workers of ``evaluate`` (``--only``, ``--jobs``) run for hours; their progress goes to stderr, since
    stdout carries the Markdown tables."""
    ev._progress("  CTChest4 (lung): (i) in 12 s")
    captured = capsys.readouterr()
    assert captured.err == "  CTChest4 (lung): (i) in 12 s\n" and captured.out == ""


def test_small_structures_are_corrected_apart_and_summarized_in_their_own_table(model, volume):
    from medsam2.train import heldout as ho

    nodule = np.zeros((Z, Y, X), bool)
    nodule[3:6, 10:14, 12:17] = True
    with_small = ho.HeldOutVolume(
        volume.name, volume.image, volume.spacing, "ct", volume.labels, volume.structures, {"nodule": nodule}
    )
    result = ev.evaluate_volume(model, with_small, log=lambda message: None, corrections=2)
    assert list(result["corrections"]) == ["organ"]  # the structures' table stays theirs alone
    curves = result["small_corrections"]["nodule"]
    assert list(curves) == list(cr.CORRECTED_METHODS) and all(len(c) == 3 for c in curves.values())
    # The nodule's curve is that of the loop run on it alone.
    start, box = ev.box_on_largest_slice(nodule)
    slices = ev.AxialSlices(model, prepare_intensities(volume.image, modality="ct"))
    alone = cr.correction_curve(cr.box_chain_segmenter(slices, start, box), nodule, 2)
    assert curves[ev.METHODS[3]] == [round(d, 4) for d in alone]

    merged = ev.merge_results(
        [{"weights": "w", "options": {"corrections": 2}, "volumes": {"CTChest4": result}}]
    )
    assert merged["corrections"] == cr.summarize_corrections(merged["volumes"])
    small = merged["small_corrections"]
    assert small == cr.summarize_corrections(merged["volumes"], "small_corrections")
    assert small["structures"] == 1 and list(small["to_reach_target"][ev.METHODS[0]]["per_structure"]) == [
        "CTChest4: nodule"
    ]
    table = report.markdown(merged)
    assert "(up to 2 corrections, 1 structures)" in table
    assert "(up to 2 corrections, 1 small structures)" in table
    assert "small_corrections" not in ev.evaluate_volume(model, with_small, log=lambda message: None)
