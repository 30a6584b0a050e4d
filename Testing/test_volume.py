"""medsam2.segment_volume: output grid, prompt placement on each axis, vote aggregation, early stop, ROI,
cancel, the input left untouched, and refused inputs.

Models: the tiny random-weight SAM 2.1 model of the golden files with its presence head shifted, so that
tracked slices are either always "present" (``present_model``) or always "absent" (``absent_model``). A
mask prompt comes back as its own mask on the prompted slice, which is what the placement checks rely on;
the absent model makes the number of slices each pass visits exactly predictable.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from golden import golden_model

import medsam2
from medsam2 import InputError, Prompt
from medsam2.io import read_image
from medsam2.volume import (
    _ROI_MARGIN_FRACTION,
    _ROI_MARGIN_VOXELS,
    Aggregation,
    _extra_axis_step,
    _ExtraAxis,
    _fit_extra_axes_to_budget,
    _inside_box,
    _labels,
    _PassRunner,
    _roi_box,
    _visited_slices,
)
from medsam2.votes import Votes

SLICERIO_DATA = Path(__import__("slicerio").__file__).parent / "data"
SHAPE = (14, 18, 22)  # every axis a different length, so a slice taken on the wrong axis cannot fit
NAMES = ("axial", "coronal", "sagittal")


@pytest.fixture(scope="module")
def absent_model() -> medsam2.SAM2Model:
    return golden_model(presence_shift=-10.0)


def _synthetic(dtype=np.float32, shape=SHAPE) -> np.ndarray:
    """A bright off-centre, lopsided blob on a noisy background: no symmetry along any axis."""
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    blob = ((z - 4) ** 2 / 9 + (y - 6 - z / 3) ** 2 / 16 + (x - 14) ** 2 / 36) < 1
    noise = np.random.default_rng(0).normal(0, 8, shape)
    return (40 + 120 * blob + noise).astype(dtype)


def _corner_mask(shape: tuple[int, int]) -> np.ndarray:
    """An L-shaped mask in the top-left quadrant: no flip or transpose of it overlaps it much."""
    rows, cols = shape
    mask = np.zeros(shape, bool)
    mask[1 : rows // 2, 1:4] = True
    mask[1:4, 1 : cols // 2] = True
    return mask


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _slice(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(array, index, axis=axis)


# ---------------------------------------------------------------- grid


@pytest.fixture(scope="module")
def chest_ct() -> np.ndarray:
    """slicerio's CTChest4 (34 x 128 x 128 CT, int32 HU), cropped to 18 x 16 x 23 voxels to stay fast."""
    return read_image(SLICERIO_DATA / "CTChest4.nrrd").array[10:28, 24:104:5, 8:120:5]


@pytest.mark.parametrize("orientations", [1, 2, 6])
def test_output_lies_on_the_input_grid_of_a_real_ct(present_model, chest_ct, orientations):
    volume = chest_ct
    z, y, x = volume.shape
    mask = np.zeros((y, x), bool)
    mask[4:11, 6:15] = True
    prompt = Prompt(axis=0, index=z // 2, mask=mask)
    result = medsam2.segment_volume(present_model, volume, [prompt], orientations=orientations)
    assert result.labels.shape == volume.shape and result.labels.dtype == np.uint8
    assert sorted(result.probabilities) == [1]
    probabilities = result.probabilities[1]
    assert probabilities.shape == volume.shape and probabilities.dtype == np.float32
    assert probabilities.min() >= 0 and probabilities.max() <= 1
    assert set(np.unique(result.labels)) <= {0, 1}
    expected_passes = {1: ["axial forward"], 2: ["axial forward", "axial reverse"]}.get(
        orientations, [f"{n} {d}" for n in NAMES for d in ("forward", "reverse")]
    )
    assert sorted(result.frames_visited) == sorted(expected_passes)
    # The other axes' passes cross the prompted slice, but it keeps what the prompt gave: the mask.
    assert _iou(result.labels[z // 2] == 1, mask) > 0.9
    if orientations == 1:  # forward only: nothing before the prompted slice was visited
        assert not result.labels[: z // 2].any()


# ---------------------------------------------------------------- prompt placement


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_mask_prompt_lands_on_its_slice_of_its_axis(present_model, axis):
    volume = _synthetic()
    depth = volume.shape[axis]
    index = depth - 4  # past the middle: the mirrored slice (depth - 1 - index) is never visited forward
    plane = tuple(n for a, n in enumerate(volume.shape) if a != axis)
    mask = _corner_mask(plane)
    result = medsam2.segment_volume(
        present_model, volume, [Prompt(axis=axis, index=index, mask=mask)], orientations=1
    )
    found = _slice(result.labels, axis, index) == 1
    assert _iou(found, mask) > 0.9
    for wrong in (mask[::-1], mask[:, ::-1], mask[::-1, ::-1]):
        assert _iou(found, wrong) < 0.3
    assert not _slice(result.labels, axis, depth - 1 - index).any()
    visited = np.flatnonzero(result.probabilities[1].any(axis=tuple(a for a in range(3) if a != axis)))
    assert visited.min() == index  # the forward pass starts on the prompted slice
    assert result.frames_visited == {f"{NAMES[axis]} forward": depth - index}


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_click_is_read_as_column_then_row_of_its_slice(axis):
    rows, cols = (n for a, n in enumerate(SHAPE) if a != axis)
    with pytest.raises(InputError, match=f"{cols} columns x {rows} rows"):
        Prompt(axis=axis, index=2, points=[(cols, 0)]).check_fits(SHAPE)
    with pytest.raises(InputError, match=f"{cols} columns x {rows} rows"):
        Prompt(axis=axis, index=2, points=[(0, rows)]).check_fits(SHAPE)
    Prompt(axis=axis, index=2, points=[(cols - 1, rows - 1)]).check_fits(SHAPE)


# ---------------------------------------------------------------- aggregation


def test_mean_of_probabilities_over_the_passes_that_visited():
    votes = Votes((3, 4, 5), [1], Aggregation.MEAN)
    votes.add(0, 1, {1: np.full((4, 5), 0.9, np.float32)})
    votes.add(0, 1, {1: np.full((4, 5), 0.2, np.float32)})
    votes.add(1, 2, {1: np.full((3, 5), 0.7, np.float32)})  # a coronal pass's slice y = 2
    votes.end_run({})
    p = votes.result()[1]
    assert np.allclose(p[1, 2], (0.9 + 0.2 + 0.7) / 3)
    assert np.allclose(p[1, 0], 0.55) and np.allclose(p[1, 3], 0.55)
    assert np.allclose(p[0, 2], 0.7) and np.allclose(p[0, 1], 0) and np.allclose(p[2, :2], 0)


def test_majority_counts_votes_above_one_half():
    votes = Votes((2, 2, 3), [1], Aggregation.MAJORITY)
    for probability in (0.9, 0.6, 0.4, 0.51, 0.1):
        votes.add(0, 0, {1: np.full((2, 3), probability, np.float32)})
    votes.add(0, 1, {1: np.full((2, 3), 0.5, np.float32)})  # exactly one half is not a vote
    votes.end_run({})
    p = votes.result()[1]
    assert np.allclose(p[0], 3 / 5) and np.allclose(p[1], 0)
    assert _labels(votes.result(), [1])[0].all()


def test_each_object_is_averaged_over_its_own_passes():
    """A pass that tracked only object 2 must not dilute object 1's probability."""
    votes = Votes((2, 3, 3), [1, 2], Aggregation.MEAN)
    votes.add(0, 0, {1: np.full((3, 3), 0.8, np.float32)})
    votes.add(0, 0, {1: np.full((3, 3), 0.6, np.float32)})
    votes.add(0, 0, {2: np.full((3, 3), 0.3, np.float32)})
    votes.end_run({})
    p = votes.result()
    assert np.allclose(p[1][0], 0.7) and np.allclose(p[2][0], 0.3)
    assert (_labels(p, [1, 2])[0] == 1).all()


def test_slices_a_pass_did_not_reach_are_votes_for_background():
    """An axis that stopped early (or skipped slices outside the ROI) had found the object ended there: a
    confident guess of another axis on those slices must not stand alone."""
    votes = Votes((3, 2, 2), [1], Aggregation.MEAN)
    votes.add(0, 0, {1: np.full((2, 2), 0.9, np.float32)})  # the axial pass reached slice 0 only
    votes.add_background(0, 1, [1, 2])
    for column in range(2):  # the sagittal pass reached every slice and says "object" everywhere
        votes.add(2, column, {1: np.full((3, 2), 0.9, np.float32)})
    votes.end_run({})
    p = votes.result()[1]
    np.testing.assert_allclose(p[0], 0.9)
    np.testing.assert_allclose(p[1:], 0.45)
    assert _labels({1: p}, [1])[1:].sum() == 0


def test_confidence_weighs_each_runs_votes_by_its_weight_for_the_object():
    votes = Votes((2, 2, 2), [1, 2], Aggregation.CONFIDENCE)
    votes.add(0, 0, {1: np.full((2, 2), 0.9, np.float32), 2: np.full((2, 2), 0.8, np.float32)})
    votes.add_background(0, 1, [1])
    votes.end_run({1: 0.8, 2: 0.5})  # the axial run
    votes.add(1, 0, {1: np.full((2, 2), 0.3, np.float32)})
    votes.add(1, 1, {1: np.full((2, 2), 0.3, np.float32)})
    votes.end_run({1: 0.2})  # a coronal run that tracked object 1 only
    p = votes.result()
    np.testing.assert_allclose(p[1][0], (0.8 * 0.9 + 0.2 * 0.3) / (0.8 + 0.2), rtol=1e-6)
    np.testing.assert_allclose(p[1][1], 0.2 * 0.3 / (0.8 + 0.2), rtol=1e-6)  # axial voted background
    np.testing.assert_allclose(p[2][0], 0.8, rtol=1e-6)  # one run: its weight cancels out
    assert not p[2][1].any()


def test_confidence_weighs_each_axis_by_its_mean_predicted_iou_where_it_found_the_object(
    present_model, monkeypatch
):
    volume = _synthetic()
    prompt = Prompt(axis=0, index=4, mask=_corner_mask(SHAPE[1:]))
    # One run (the prompt axis, both directions): its weight cancels out.
    mean, weighted = (
        medsam2.segment_volume(present_model, volume, [prompt], orientations=2, aggregate=a).probabilities[1]
        for a in ("mean", "confidence")
    )
    np.testing.assert_allclose(weighted, mean, atol=1e-6)

    sessions: list[medsam2.Session] = []  # one per run; kept, so that no two share an id()
    found: dict[int, list[float]] = {}  # per session, the IoUs of its tracked frames that found the object
    weights: list[dict[int, float]] = []
    track_frame, end_run = medsam2.Session._track_frame, Votes.end_run

    def tracking(session, track, t, reverse):
        record = track_frame(session, track, t, reverse)
        if session not in sessions:
            sessions.append(session)
        if (record.low_res_logits > 0).any():
            found.setdefault(id(session), []).append(record.iou)
        return record

    def ending(votes, run_weights):
        weights.append(dict(run_weights))
        end_run(votes, run_weights)

    monkeypatch.setattr(medsam2.Session, "_track_frame", tracking)
    monkeypatch.setattr(Votes, "end_run", ending)
    six = medsam2.segment_volume(present_model, volume, [prompt], aggregate="confidence", roi=None)
    assert len(weights) == len(found) == 3  # the prompt axis, then the two others
    for run_weights, ious in zip(weights, found.values()):
        assert run_weights == pytest.approx({1: float(np.mean(ious))})
    mean = medsam2.segment_volume(present_model, volume, [prompt], aggregate="mean", roi=None)
    assert not np.allclose(six.probabilities[1], mean.probabilities[1])


def test_labels_pick_the_most_probable_object_above_one_half():
    p1 = np.array([[[0.9, 0.6, 0.2, 0.5]]], np.float32)
    p2 = np.array([[[0.7, 0.8, 0.3, 0.4]]], np.float32)
    labels = _labels({3: p1, 300: p2}, [3, 300])
    assert labels.dtype == np.uint16
    assert labels.tolist() == [[[3, 300, 0, 0]]]
    assert _labels({1: p1}, [1]).dtype == np.uint8


# ---------------------------------------------------------------- early stop and ROI


def test_early_stop_ends_a_direction_three_slices_after_the_object_is_lost(absent_model):
    volume = _synthetic()
    index = 6
    prompt = Prompt(axis=0, index=index, mask=_corner_mask(volume.shape[1:]))
    quick = medsam2.segment_volume(absent_model, volume, [prompt], orientations=2)
    full = medsam2.segment_volume(absent_model, volume, [prompt], orientations=2, early_stop=False)
    assert not np.delete(full.labels, index, axis=0).any()  # the premise: every tracked slice is empty
    assert full.frames_visited == {"axial forward": SHAPE[0] - index, "axial reverse": index + 1}
    assert quick.frames_visited == {"axial forward": 4, "axial reverse": 4}  # the prompt + 3 empty slices
    assert np.array_equal(quick.labels, full.labels)


def test_auto_roi_visits_only_the_slices_around_the_first_pass(absent_model):
    shape = (6, 16, 17)
    volume, index = _synthetic(shape=shape), 3
    mask = np.zeros(shape[1:], bool)
    mask[1:4, 2:5] = True
    prompt = Prompt(axis=0, index=index, mask=mask)
    first_pass = medsam2.segment_volume(absent_model, volume, [prompt], orientations=2).probabilities[1] > 0.5
    whole = medsam2.segment_volume(absent_model, volume, [prompt], roi=None, early_stop=False)
    roi = medsam2.segment_volume(absent_model, volume, [prompt], roi="auto", early_stop=False)
    for axis in (1, 2):
        visits = {
            name: r.frames_visited[f"{NAMES[axis]} forward"] + r.frames_visited[f"{NAMES[axis]} reverse"]
            for name, r in [("whole", whole), ("roi", roi)]
        }
        # Forward and reverse both start on the seed slice; every other slice is visited once.
        assert visits["whole"] == shape[axis] + 1
        hits = np.flatnonzero(first_pass.any(axis=tuple(a for a in range(3) if a != axis)))
        margin = max(int(np.ceil(_ROI_MARGIN_FRACTION * (hits[-1] + 1 - hits[0]))), _ROI_MARGIN_VOXELS)
        window = min(hits[-1] + 1 + margin, shape[axis]) - max(hits[0] - margin, 0)
        assert window < shape[axis] and visits["roi"] == window + 1
    assert sum(roi.frames_visited.values()) < sum(whole.frames_visited.values())
    # The absent model finds only the prompted slice, whatever is skipped.
    for r in (whole, roi):
        assert np.flatnonzero(r.labels.any(axis=(1, 2))).tolist() == [index]


def test_the_vote_box_is_the_first_pass_extent_with_a_margin_on_every_axis():
    found = np.zeros((40, 50, 60), bool)
    found[10:30, 20:22, 5:45] = True
    z, y, x = _roi_box(found, None)
    assert (z.start, z.stop) == (10 - 4, 30 + 4)  # 15 % of 20 voxels is 3: the 4-voxel floor applies
    assert (y.start, y.stop) == (20 - 4, 22 + 4)
    assert (x.start, x.stop) == (0, 45 + 6)  # 15 % of 40 voxels, clipped to the volume at 0
    z, y, x = _roi_box(found, spacing=(1.0, 0.5, 2.0))  # at least 5 mm: 5, 10 and 3 voxels
    assert (z.start, y.start, y.stop) == (5, 10, 32) and (x.start, x.stop) == (0, 51)
    assert _roi_box(np.zeros((4, 4, 4), bool), None) is None


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_extra_axis_votes_outside_the_box_are_background(axis):
    box = (slice(2, 5), slice(1, 3), slice(4, 8))
    shape = [s for a, s in enumerate((6, 7, 9)) if a != axis]
    prob = np.full(shape, 0.8, np.float32)
    inside = _inside_box(prob, box, axis, index=box[axis].start)
    expected = np.zeros(shape, np.float32)
    rows, cols = (box[a] for a in range(3) if a != axis)
    expected[rows, cols] = 0.8
    np.testing.assert_array_equal(inside, expected)
    assert not _inside_box(prob, box, axis, index=box[axis].stop).any()  # a slice past the box


def test_extra_axes_are_visited_about_as_far_apart_in_mm_as_the_prompt_axis_slices():
    assert _extra_axis_step((10.0, 3.0, 3.0), [0], axis=1) == 3  # 10 mm axial slices, 3 mm pixels
    assert _extra_axis_step((10.0, 3.0, 3.0), [0, 2], axis=1) == 1  # an object prompted on sagittal
    assert _extra_axis_step((1.0, 0.8, 0.8), [0], axis=2) == 1
    assert _extra_axis_step((1.0, 4.0, 4.0), [0], axis=1) == 1  # never finer than every slice
    assert _extra_axis_step(None, [0], axis=1) == 1
    # Counted from the first prompted slice, both ways, and every prompted slice is visited.
    assert _visited_slices(2, 20, [7], step=3) == [4, 7, 10, 13, 16, 19]
    assert _visited_slices(2, 20, [12, 7], step=3) == [4, 7, 10, 12, 13, 16, 19]
    assert _visited_slices(0, 5, [3], step=1) == [0, 1, 2, 3, 4]


def _plans(*ranges_and_steps) -> list[_ExtraAxis]:
    """Extra-axis plans over the given ``((start, stop), mm step)``, each seeded in the middle of its range."""
    plans = []
    for axis, ((start, stop), step) in enumerate(ranges_and_steps, start=1):
        seed = Prompt(axis=axis, index=(start + stop) // 2, box=(0, 0, 4, 4))
        plans.append(_ExtraAxis(axis, [seed], [], (start, stop), step=step))
    return plans


def test_extra_axes_together_predict_no_more_frames_than_the_first_pass():
    def fitted(budget, *ranges_and_steps):
        plans = _plans(*ranges_and_steps)
        _fit_extra_axes_to_budget(plans, budget)
        return [plan.step for plan in plans], sum(plan.frames(plan.step) for plan in plans)

    # Every slice: 61 + 61 frames; every fourth: 16 + 16; every fifth: 13 + 13.
    assert fitted(200, ((0, 60), 1), ((5, 65), 1)) == ([1, 1], 122)
    assert fitted(31, ((0, 60), 1), ((5, 65), 1)) == ([5, 5], 26)
    # The step in mm of the prompt axis's slices stays the least step; the other axis takes up the budget.
    assert fitted(31, ((0, 60), 6), ((5, 65), 1)) == ([6, 4], 11 + 16)
    # However small the budget, each run still visits 8 slices of its range (60 // 8 = 7 apart).
    assert fitted(5, ((0, 60), 1), ((5, 65), 1)) == ([7, 7], 10 + 10)
    assert fitted(5, ((0, 12), 1), ((5, 65), 1))[0] == [1, 7]


def test_the_extra_axes_of_segment_volume_keep_to_the_first_pass_frames(present_model):
    shape = (30, 40, 44)
    volume = _synthetic(shape=shape)
    prompt = Prompt(axis=0, index=12, mask=_corner_mask(shape[1:]))
    result = medsam2.segment_volume(
        present_model, volume, [prompt], spacing=(1.0, 1.0, 1.0), early_stop=False
    )
    visited = result.frames_visited
    first = visited["axial forward"] + visited["axial reverse"]
    extra = sum(visited[f"{NAMES[a]} {d}"] for a in (1, 2) for d in ("forward", "reverse"))
    unlimited = medsam2.segment_volume(present_model, volume, [prompt], roi=None, early_stop=False)
    assert first == shape[0] + 1
    assert extra <= first < sum(unlimited.frames_visited.values()) - first


def test_slices_an_extra_axis_steps_over_get_votes_interpolated_from_their_visited_neighbours(monkeypatch):
    volume = _synthetic()
    model = golden_model(presence_shift=5.0)  # tracks everywhere: every visited slice has a vote
    prompt = Prompt(axis=0, index=4, mask=_corner_mask(SHAPE[1:]))
    every = medsam2.segment_volume(model, volume, [prompt], spacing=(1.0, 1.0, 1.0), early_stop=False)
    seen: dict[tuple[int, int], np.ndarray] = {}  # the votes of the slices the model saw
    voted: dict[tuple[int, int], list[np.ndarray]] = {}  # every vote
    vote, add = _PassRunner._vote, Votes.add

    def seeing(runner, run, t, probabilities, *args):
        result = vote(runner, run, t, probabilities, *args)
        seen[(run.axis, run.visit[t])] = result[1].copy()
        return result

    def adding(votes, axis, index, probabilities, *args):
        voted.setdefault((axis, index), []).append(probabilities[1].copy())
        add(votes, axis, index, probabilities, *args)

    monkeypatch.setattr(_PassRunner, "_vote", seeing)
    monkeypatch.setattr(Votes, "add", adding)
    # 3 mm axial slices and 1 mm pixels: every third coronal and sagittal slice is seen.
    strided = medsam2.segment_volume(model, volume, [prompt], spacing=(3.0, 1.0, 1.0), early_stop=False)
    for axis in (1, 2):
        name = NAMES[axis]
        frames = strided.frames_visited[f"{name} forward"] + strided.frames_visited[f"{name} reverse"]
        assert frames < every.frames_visited[f"{name} forward"] + every.frames_visited[f"{name} reverse"]
        visited = sorted(i for a, i in seen if a == axis)
        assert all(b - a == 3 for a, b in zip(visited, visited[1:]))
        # Every slice between two seen ones gets one vote, interpolated between theirs.
        for before, after in zip(visited, visited[1:]):
            for index in range(before + 1, after):
                weight = (index - before) / (after - before)
                expected = (1 - weight) * seen[(axis, before)] + weight * seen[(axis, after)]
                assert len(voted[(axis, index)]) == 1
                np.testing.assert_allclose(voted[(axis, index)][0], expected, atol=1e-6)


def test_between_two_prompts_the_direction_from_the_nearer_prompt_counts_more(present_model, monkeypatch):
    """Between two prompted slices of an object both directions pass, each carrying the object from the prompt
    behind it. After a wrong first prompt and a correction they disagree entirely; as two equal votes they
    cancelled to 0.5 and left the slices empty (the held-out MR stomach, BENCHMARKS 4g). The nearer prompt's
    direction now counts more, linearly; where one direction passes it counts 1."""
    volume = _synthetic()
    mask = _corner_mask(SHAPE[1:])
    prompts = [Prompt(axis=0, index=2, mask=mask), Prompt(axis=0, index=10, mask=mask[::-1, ::-1].copy())]
    votes: dict[int, list[tuple[np.ndarray, float]]] = {}
    add = Votes.add

    def recording(self, axis, index, probabilities, weights=None):
        weight = 1.0 if weights is None else weights[1]
        votes.setdefault(index, []).append((probabilities[1].copy(), weight))
        add(self, axis, index, probabilities, weights)

    monkeypatch.setattr(Votes, "add", recording)
    result = medsam2.segment_volume(present_model, volume, prompts, orientations=2, early_stop=False)
    for index in range(3, 10):
        (forward, forward_weight), (reverse, reverse_weight) = votes[index]
        assert (forward_weight, reverse_weight) == pytest.approx(((10 - index) / 8, (index - 2) / 8))
        expected = forward_weight * forward + reverse_weight * reverse
        np.testing.assert_allclose(result.probabilities[1][index], expected, atol=1e-6)
    for index in (0, 1, 11, 13):
        assert [weight for _, weight in votes[index]] == [1.0]
    assert [weight for _, weight in votes[2]] == [1.0, 1.0]


def test_objects_prompted_on_different_axes_keep_their_own_votes(absent_model):
    """Object 2's coronal passes visit object 1's voxels; they must not count as votes against it."""
    volume = _synthetic()
    one = Prompt(axis=0, index=5, obj_id=1, mask=_corner_mask(SHAPE[1:]))
    two = Prompt(axis=1, index=9, obj_id=2, box=(12, 2, 20, 10))
    alone = medsam2.segment_volume(absent_model, volume, [one], orientations=2)
    both = medsam2.segment_volume(absent_model, volume, [one, two], orientations=2)
    assert sorted(both.frames_visited) == [
        f"{n} {d}" for n in ("axial", "coronal") for d in ("forward", "reverse")
    ]
    assert np.array_equal(both.probabilities[1], alone.probabilities[1])
    assert np.array_equal(both.labels == 1, alone.labels == 1)


@pytest.mark.parametrize("orientations", [2, 6])
def test_objects_prompted_on_different_slices_are_tracked_only_from_their_own_prompts(
    present_model, orientations
):
    """Before its own prompt an object has no memory and (for a box-tracking model) no box: the passes that
    start at another object's prompt must neither vote for it there nor feed its memory."""
    volume = _synthetic()
    one = Prompt(axis=0, index=3, obj_id=1, mask=_corner_mask(SHAPE[1:]))
    two = Prompt(axis=0, index=9, obj_id=2, box=(12, 2, 20, 10))
    options = dict(orientations=orientations, roi=None)  # self-sorting: each object draws on its own
    both = medsam2.segment_volume(present_model, volume, [one, two], **options)
    for prompt in (one, two):
        alone = medsam2.segment_volume(present_model, volume, [prompt], **options)
        np.testing.assert_allclose(
            both.probabilities[prompt.obj_id], alone.probabilities[prompt.obj_id], atol=1e-5
        )


def test_a_box_tracking_model_tracks_the_other_axes_with_the_first_pass_boxes(monkeypatch):
    """On the other axes, each slice where the first pass found the object is tracked with the box of the first
    pass's mask there (Session.add_guide); the prompt axis is not guided."""
    model = golden_model(presence_shift=5.0)
    model.config = model.config.replace(tracking_box_margin=0.05)
    volume = _synthetic()
    prompt = Prompt(axis=0, index=4, box=(8, 2, 20, 12))
    first_pass = medsam2.segment_volume(model, volume, [prompt], orientations=2).probabilities[1] > 0.5
    guided = []
    add_guide = medsam2.Session.add_guide

    def recording(session, frame, obj_id, box):
        guided.append((session.frames.frames.shape, frame, tuple(box)))
        add_guide(session, frame, obj_id, box)

    monkeypatch.setattr(medsam2.Session, "add_guide", recording)
    medsam2.segment_volume(model, volume, [prompt], orientations=6, roi=None)
    for axis in (1, 2):
        mask = np.moveaxis(first_pass, axis, 0)
        expected = []
        for t in np.flatnonzero(mask.any(axis=(1, 2))):
            rows, cols = np.nonzero(mask[t])
            expected.append((mask.shape, t, (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)))
        assert [g for g in guided if g[0] == mask.shape] == expected
    assert len(guided) == sum(first_pass.any(axis=a).sum() for a in ((0, 2), (0, 1))) > 0


def test_prompted_slices_keep_the_prompt_but_seeded_slices_are_voted_on(absent_model):
    """With the absent model every tracked slice is empty, so the other axes vote "no" on the prompted
    slice's voxels; the user's prompt still wins there, and only there."""
    volume = _synthetic()
    mask = _corner_mask(SHAPE[1:])
    correction = np.zeros((SHAPE[0], SHAPE[2]), bool)
    correction[6:12, 3:12] = True  # agrees with the axial mask where the two slices cross (z 5, y 15)
    prompts = [Prompt(axis=0, index=5, mask=mask), Prompt(axis=1, index=15, mask=correction)]
    result = medsam2.segment_volume(absent_model, volume, prompts, orientations=6, roi=None)
    assert np.array_equal(result.labels[5] == 1, mask)
    assert np.array_equal(result.labels[:, 15] == 1, correction)
    # Elsewhere it is the vote: the seeded coronal and sagittal slices are outvoted by empty slices.
    seeded = result.probabilities[1].copy()
    seeded[5] = 0
    seeded[:, 15] = 0
    assert (seeded <= 0.5).all()


# ---------------------------------------------------------------- cancel


def test_cancel_stops_within_one_frame_and_returns_nothing(present_model):
    volume = _synthetic()
    cancel = threading.Event()
    calls = []

    def progress(done, total, message):
        calls.append((done, total, message))
        if done == 3:
            cancel.set()

    with pytest.raises(medsam2.Cancelled):
        medsam2.segment_volume(
            present_model,
            volume,
            [Prompt(axis=0, index=2, points=[(14, 6)])],
            progress=progress,
            cancel=cancel,
        )
    assert [c[0] for c in calls] == [1, 2, 3]
    assert all(message == "axial forward" for _, _, message in calls)


def test_a_cancel_set_beforehand_does_no_work(present_model):
    cancel = threading.Event()
    cancel.set()
    calls = []
    with pytest.raises(medsam2.Cancelled):
        medsam2.segment_volume(
            present_model,
            _synthetic(),
            [Prompt(axis=0, index=2, points=[(14, 6)])],
            progress=lambda *a: calls.append(a),
            cancel=cancel,
        )
    assert calls == []


@pytest.mark.parametrize("orientations", [2, 6])
def test_progress_counts_every_frame_and_ends_complete(absent_model, orientations):
    """Two objects on different axes: the coronal and axial axes each run twice with orientations=6."""
    calls = []
    prompts = [
        Prompt(axis=1, index=6, obj_id=1, mask=_corner_mask((SHAPE[0], SHAPE[2]))),
        Prompt(axis=0, index=9, obj_id=2, mask=_corner_mask(SHAPE[1:])[::-1]),
    ]
    result = medsam2.segment_volume(
        absent_model, _synthetic(), prompts, orientations=orientations, progress=lambda *a: calls.append(a)
    )
    *frames, final = calls
    assert [done for done, _, _ in frames] == list(range(1, len(frames) + 1))
    assert all(done <= total for done, total, _ in calls)
    assert final == (len(frames), len(frames), "done")
    assert sum(result.frames_visited.values()) == len(frames)


# ---------------------------------------------------------------- the input is never modified


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float64, np.float32])
def test_the_input_volume_is_left_unchanged(absent_model, dtype):
    volume = _synthetic(dtype)
    if dtype == np.int16:  # CT-like Hounsfield units, so the CT window path runs too
        volume = volume * 10 - 1000
    before = volume.copy()
    volume.flags.writeable = False
    prompts = [Prompt(axis=0, index=4, box=(9, 2, 20, 10))]
    result = medsam2.segment_volume(absent_model, volume, prompts, orientations=6)
    assert volume.dtype == before.dtype and np.array_equal(volume, before)
    assert result.labels.shape == volume.shape


# ---------------------------------------------------------------- refused input


def _point(axis=0, index=2, xy=(5, 5)):
    return [Prompt(axis=axis, index=index, points=[xy])]


@pytest.mark.parametrize(
    "volume, prompts, message",
    [
        (
            _synthetic(),
            _point(index=SHAPE[0]),
            r"slice 14 is outside the volume: the axial axis has slices 0\.\.13",
        ),
        (_synthetic(), _point(axis=2, index=-1), "outside the volume"),
        (_synthetic(), _point(xy=(SHAPE[2], 3)), "point lies outside the axial slice"),
        (_synthetic(), _point(axis=1, xy=(3, SHAPE[0] + 2)), "point lies outside the coronal slice"),
        (_synthetic(), [Prompt(axis=0, index=1, box=(30, 30, 40, 40))], "box .* lies outside"),
        (
            _synthetic(),
            [Prompt(axis=1, index=3, mask=np.ones(SHAPE[1:], bool))],
            r"mask has shape \(18, 22\), but the coronal slice .* needs shape \(14, 22\)",
        ),
        (_synthetic()[0], _point(), "2D image"),
        (_synthetic()[None], _point(), "4D"),
        (_synthetic()[:1], _point(index=0), "at least 2 voxels"),
        (np.where(_synthetic() > 100, np.nan, 1.0), _point(), "NaN"),
        (np.full(SHAPE, 7, np.int16), _point(), "same intensity"),
        (_synthetic().astype(bool), _point(), "real intensities"),
        (_synthetic(), [Prompt(axis=0, index=1, obj_id=70000, points=[(1, 1)])], "at most 65535"),
        (_synthetic(), [], "at least one prompt"),
        (_synthetic(), [{"axis": 0, "index": 1}], "medsam2.Prompt"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(absent_model, volume, prompts, message):
    with pytest.raises(InputError, match=message):
        medsam2.segment_volume(absent_model, volume, prompts)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"box": (4, 4, 4, 9)}, "empty"),
        ({"box": (4, 9, 8, 2)}, "empty"),
        ({"mask": np.zeros((18, 22), bool)}, "mask is empty"),
        ({"mask": np.ones((2, 18, 22), bool)}, "2D image"),
        ({}, "needs points, a box or a mask"),
        ({"box": (1, 1, 5, 5), "labels": [1]}, "without points"),
        ({"points": [(1, 1)], "labels": [1, 1]}, "each point"),
    ],
)
def test_bad_prompts_are_refused_when_made(kwargs, message):
    with pytest.raises(InputError, match=message):
        Prompt(axis=0, index=1, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"orientations": 3}, "orientations must be 1, 2 or 6"),
        ({"aggregate": "median"}, "aggregate must be"),
        ({"roi": "tight"}, "roi must be"),
        ({"window": "liver"}, "Unknown window"),
        ({"modality": "xray"}, "Unknown modality"),
        ({"spacing": (1.0, 0.0, 1.0)}, "spacing must be three positive"),
        ({"spacing": (1.0, 1.0)}, "spacing must be three positive"),
    ],
)
def test_bad_options_are_refused(absent_model, kwargs, message):
    with pytest.raises(InputError, match=message):
        medsam2.segment_volume(absent_model, _synthetic(), _point(), **kwargs)


def test_prompts_of_one_object_on_two_axes_need_six_orientations(absent_model):
    prompts = [*_point(axis=0), *_point(axis=1)]
    with pytest.raises(InputError, match="orientations=6"):
        medsam2.segment_volume(absent_model, _synthetic(), prompts, orientations=2)
