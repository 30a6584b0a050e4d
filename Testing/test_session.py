"""medsam2.Session: input validation, corrections on tracked frames with re-propagation, and reset.

Runs the tiny random-weight SAM 2.1 model of the golden files, its presence head shifted so that the object
is tracked as present (a mask prompt is the one output such a model gets "right": it is returned as is).
"""

from __future__ import annotations

import numpy as np
import pytest
from golden import golden_model

import medsam2
from medsam2 import InputError

T, H, W = 8, 24, 32


@pytest.fixture(scope="module")
def model() -> medsam2.SAM2Model:
    return golden_model(presence_shift=5.0)


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    rng = np.random.default_rng(1)
    z, y, x = np.mgrid[:T, :H, :W]
    blob = ((y - 8 - z) ** 2 / 20 + (x - 10 - z) ** 2 / 40) < 1
    return (0.2 + 0.6 * blob + rng.normal(0, 0.05, blob.shape)).clip(0, 1).astype(np.float32)


def _box_mask(y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((H, W), np.float32), "Frames must be"),
        (np.zeros((T, H, W, 4), np.float32), "Frames must be"),
        (np.zeros((T, H, W, 3, 1), np.float32), "Frames must be"),
        (np.zeros((0, H, W), np.float32), "at least one image"),
        (np.zeros((T, 1, W), np.float32), "at least one image"),
        (np.full((T, H, W), "a"), "real numbers"),
        (np.empty((T, H, W), object), "real numbers"),
        (np.zeros((T, H, W), np.complex64), "real numbers"),
        (np.full((T, H, W), np.nan, np.float32), "NaN or infinite"),
    ],
)
def test_bad_frames_are_refused(model, bad, message):
    with pytest.raises(InputError, match=message):
        medsam2.Session(model, bad)


@pytest.mark.parametrize(
    "prompt, message",
    [
        ({"points": [(W + 1, 3)]}, "outside the 32x24 frame"),
        ({"points": [(3, -0.5)]}, "outside"),
        ({"box": (40, 2, 50, 10)}, "outside"),
        ({"box": (10, 5, 10, 9)}, "x1 > x0"),
        ({"box": (10, 9, 12, 3)}, "y1 > y0"),
        ({"box": (1, 2, 3)}, "A box must be"),
        ({"points": [(1, 2, 3)]}, "Points must be"),
        ({"points": [(np.nan, 2)]}, "Points must be"),
        ({"points": [(1, 2)], "labels": [1, 0]}, "Labels must"),
        ({"points": [(1, 2)], "labels": [2]}, "Labels must"),
        ({"labels": [1]}, "without points"),
        ({"box": (1, 1, 5, 5), "labels": [1]}, "without points"),
        ({"mask": np.ones((W, H), bool)}, "shape"),
        ({"mask": np.ones((H, W, 1), bool)}, "shape"),
        ({"mask": np.zeros((H, W), bool)}, "empty"),
        ({"mask": np.ones((H, W), bool), "points": [(1, 1)]}, "not both"),
        ({}, "needs points, a box or a mask"),
    ],
)
def test_bad_prompts_are_refused(model, frames, prompt, message):
    session = medsam2.Session(model, frames)
    with pytest.raises(InputError, match=message):
        session.add_prompt(2, **prompt)
    assert session.obj_ids == []  # a refused prompt leaves nothing behind


@pytest.mark.parametrize("frame", [-1, T])
def test_prompt_on_a_frame_outside_the_sequence_is_refused(model, frames, frame):
    session = medsam2.Session(model, frames)
    with pytest.raises(InputError, match=f"outside the sequence of {T} frames"):
        session.add_prompt(frame, points=[(4, 4)])


def test_propagation_before_any_prompt_is_refused(model, frames):
    session = medsam2.Session(model, frames)
    with pytest.raises(InputError, match="Add a prompt before propagating"):
        next(session.propagate())
    session.add_prompt(1, points=[(4, 4)])
    with pytest.raises(InputError, match="outside the sequence"):
        next(session.propagate(start=T + 3))


def test_outputs_are_logits_at_the_frame_size(model, frames):
    session = medsam2.Session(model, frames, memory=medsam2.MemoryOptions(policy="recent"))
    logits = session.add_prompt(2, box=(4, 3, 20, 15))
    assert logits.shape == (H, W) and logits.dtype == np.float32
    results = dict(session.propagate(start=2, max_frames=3))
    assert sorted(results) == [2, 3, 4, 5]
    assert all(out[1].shape == (H, W) and out[1].dtype == np.float32 for out in results.values())
    assert sorted(t for t, _ in session.propagate(start=2, reverse=True)) == [0, 1, 2]


def test_box_reaching_past_the_frame_is_clipped(model, frames):
    inside = medsam2.Session(model, frames).add_prompt(2, box=(4, 3, W, H))
    beyond = medsam2.Session(model, frames).add_prompt(2, box=(4, 3, W + 7, H + 5))
    np.testing.assert_array_equal(inside, beyond)


# ---------------------------------------------------------------- corrections


@pytest.mark.parametrize("policy", ["recent", "self-sorting"])
def test_correction_on_a_tracked_frame_becomes_a_prompt_and_repropagation_recomputes(model, frames, policy):
    session = medsam2.Session(model, frames, memory=medsam2.MemoryOptions(policy=policy))
    first_mask = _box_mask(4, 6, 14, 18)
    session.add_prompt(1, mask=first_mask)
    before = {t: out[1] for t, out in session.propagate()}
    assert sorted(before) == list(range(1, T))
    track = session.tracks[1]
    assert 4 in track.tracked and 4 not in track.conditioning

    correction = _box_mask(12, 20, 22, 30)  # somewhere else, so it cannot agree with the tracked result
    assert _iou(before[4] > 0, correction) < 0.5
    logits = session.add_prompt(4, mask=correction)
    assert _iou(logits > 0, correction) > 0.9

    after = {t: out[1] for t, out in session.propagate()}
    assert sorted(track.conditioning) == [1, 4] and 4 not in track.tracked
    assert _iou(after[4] > 0, correction) > 0.9  # the prompted result, not a re-tracked one
    assert _iou(after[1] > 0, first_mask) > 0.9
    for t in (2, 3, 5, 6, 7):  # every other frame was tracked again with the new prompt in memory
        assert not np.array_equal(after[t], before[t]), f"frame {t} was not recomputed"


def test_clicks_on_a_tracked_frame_refine_it(model, frames):
    session = medsam2.Session(model, frames, memory=medsam2.MemoryOptions(policy="recent"))
    session.add_prompt(1, box=(6, 4, 18, 14))
    before = dict(session.propagate())
    refined = session.add_prompt(5, points=[(25, 18)], labels=[0])
    assert not np.array_equal(refined, before[5][1])
    list(session.propagate())
    assert sorted(session.tracks[1].conditioning) == [1, 5]


def test_two_objects_are_tracked_together(model, frames):
    session = medsam2.Session(model, frames, memory=medsam2.MemoryOptions(policy="recent"))
    session.add_prompt(0, obj_id=1, mask=_box_mask(2, 2, 10, 10))
    session.add_prompt(3, obj_id=7, mask=_box_mask(14, 20, 22, 30))
    results = dict(session.propagate())
    assert session.obj_ids == [1, 7]
    assert sorted(results) == list(range(T)) and all(sorted(out) == [1, 7] for out in results.values())
    assert _iou(results[3][7] > 0, _box_mask(14, 20, 22, 30)) > 0.9


@pytest.mark.parametrize("reverse", [False, True])
def test_from_own_prompts_tracks_each_object_only_past_its_own_prompt(model, frames, reverse):
    """Each object's frames are those it gets when prompted alone; before its own prompt it has no entry."""
    masks = {1: _box_mask(2, 2, 10, 10), 7: _box_mask(14, 20, 22, 30)}
    prompted = {1: 2, 7: 5}

    def run(objects: list[int]) -> dict[int, dict[int, np.ndarray]]:
        session = medsam2.Session(model, frames)  # self-sorting: each object draws on its own
        for obj_id in objects:
            session.add_prompt(prompted[obj_id], obj_id=obj_id, mask=masks[obj_id])
        start = max(prompted[o] for o in objects) if reverse else min(prompted[o] for o in objects)
        return dict(session.propagate(start=start, reverse=reverse, from_own_prompts=True))

    both = run([1, 7])
    for obj_id in (1, 7):
        alone = run([obj_id])
        own = [t for t in both if obj_id in both[t]]
        assert own == sorted(alone, reverse=reverse)
        assert own == (list(range(prompted[obj_id], -1, -1)) if reverse else list(range(prompted[obj_id], T)))
        for t in own:
            np.testing.assert_allclose(both[t][obj_id], alone[t][obj_id], atol=1e-5)


# ---------------------------------------------------------------- reset


def test_reset_forgets_everything_and_restarts_the_random_draws(model, frames):
    session = medsam2.Session(model, frames, seed=5)
    mask = _box_mask(4, 6, 14, 18)
    session.add_prompt(1, mask=mask)
    first = {t: out[1] for t, out in session.propagate()}
    assert len(session.tracks[1].bank) >= 2  # the bank resampled from several entries
    encoded = session.frames_encoded

    session.reset()
    assert session.obj_ids == []
    with pytest.raises(InputError, match="Add a prompt"):
        next(session.propagate())
    session.add_prompt(1, mask=mask)
    again = {t: out[1] for t, out in session.propagate()}
    assert all(np.array_equal(first[t], again[t]) for t in first)
    assert session.frames_encoded == encoded  # image features were kept

    fresh = medsam2.Session(model, frames, seed=5)
    fresh.add_prompt(1, mask=mask)
    assert all(np.array_equal(first[t], out[1]) for t, out in fresh.propagate())
