"""Slices marked absent (``Prompt(absent=True)``): the radiologist's "the object is not here" bounds tracking.

Engine side: which slices an object may still reach (``allowed_slices``), that ``segment_volume`` leaves the
object out beyond an absent slice on every pass (the tracked one and the extra axes) and stops tracking there,
the wire format, and refused inputs. The Slicer side (an erased slice becomes an absent prompt) is in
``test_slicer_logic.py``; the simulated user of the evaluation in ``test_corrections.py``.

Model: ``present_model`` (conftest), a tiny model that finds the object on every tracked slice: without a
bound, the object runs through the volume.
"""

from __future__ import annotations

import numpy as np
import pytest

import medsam2
from medsam2 import InputError, Prompt
from medsam2.absent import allowed_slices, footprint
from medsam2.service.wire import decode_prompt, encode_prompt

SHAPE = (14, 18, 22)


def _volume() -> np.ndarray:
    z, y, x = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    blob = ((y - 8) ** 2 / 16 + (x - 11) ** 2 / 25) < 1
    noise = np.random.default_rng(0).normal(0, 8, SHAPE)
    return (40 + 120 * blob + noise).astype(np.float32)


def _square(shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[5:12, 6:16] = True
    return mask


def test_allowed_slices_are_the_runs_between_absent_slices_that_hold_a_prompt():
    box = Prompt(axis=0, index=6, box=(2, 2, 9, 9))
    absent = [Prompt(axis=0, index=i, absent=True) for i in (3, 9)]
    allowed = allowed_slices([box, *absent], 1, 0, 14)
    assert np.flatnonzero(allowed).tolist() == [4, 5, 6, 7, 8]
    # A second prompt beyond an absent slice keeps its own run; the absent slice itself never is.
    second = Prompt(axis=0, index=11, box=(2, 2, 9, 9))
    allowed = allowed_slices([box, second, *absent], 1, 0, 14)
    assert np.flatnonzero(allowed).tolist() == [4, 5, 6, 7, 8, 10, 11, 12, 13]
    # Other objects and other axes are not bounded by these.
    assert allowed_slices([box, *absent], 2, 0, 14) is None
    assert allowed_slices([box, *absent], 1, 1, 18) is None


def test_a_prompt_on_another_axis_reaches_the_slices_it_covers():
    """An axial box at rows 2..8 puts the object on coronal slices 2..8 (coronal index = row); a coronal mask
    on rows (z) 3..5 puts it on axial slices 3..5; points count only when positive."""
    assert footprint(Prompt(axis=0, index=6, box=(1, 2, 4, 9)), 1) == set(range(2, 9))
    assert footprint(Prompt(axis=0, index=6, box=(1, 2, 4, 9)), 2) == set(range(1, 4))
    mask = np.zeros((14, 22), bool)
    mask[3:6, 10:12] = True
    assert footprint(Prompt(axis=1, index=8, mask=mask), 0) == {3, 4, 5}
    assert footprint(Prompt(axis=1, index=8, mask=mask), 2) == {10, 11}
    clicks = Prompt(axis=2, index=4, points=[(3, 7), (9, 1)], labels=[1, 0])
    assert footprint(clicks, 0) == {7} and footprint(clicks, 1) == {3}


def test_absent_prompts_are_refused_with_content_alone_or_on_a_prompted_slice(present_model):
    with pytest.raises(InputError, match="takes no points, box or mask"):
        Prompt(axis=0, index=3, box=(1, 1, 4, 4), absent=True)
    volume = _volume()
    model = present_model
    with pytest.raises(InputError, match="only slices marked absent"):
        medsam2.segment_volume(model, volume, [Prompt(axis=0, index=3, absent=True)])
    both = [Prompt(axis=0, index=6, mask=_square(SHAPE[1:])), Prompt(axis=0, index=6, absent=True)]
    with pytest.raises(InputError, match="both prompted and marked absent on axial slice 6"):
        medsam2.segment_volume(model, volume, both)
    with pytest.raises(InputError, match="outside the volume"):
        medsam2.segment_volume(
            model, volume, [both[0], Prompt(axis=0, index=SHAPE[0], absent=True)], orientations=2
        )


@pytest.mark.parametrize("orientations", [2, 6])
def test_an_absent_slice_ends_the_object_on_every_pass(present_model, orientations):
    volume = _volume()
    prompt = Prompt(axis=0, index=6, mask=_square(SHAPE[1:]))
    unbounded = medsam2.segment_volume(present_model, volume, [prompt], orientations=orientations)
    found = np.flatnonzero(unbounded.labels.any(axis=(1, 2)))
    assert found.min() < 3 and found.max() > 9  # the always-present model runs on past both marks

    marks = [Prompt(axis=0, index=3, absent=True), Prompt(axis=0, index=9, absent=True)]
    bounded = medsam2.segment_volume(present_model, volume, [prompt, *marks], orientations=orientations)
    found = np.flatnonzero(bounded.labels.any(axis=(1, 2)))
    assert found.min() >= 4 and found.max() <= 8
    assert not bounded.probabilities[1][:4].any() and not bounded.probabilities[1][9:].any()
    # Inside the bounds the object is still tracked, and the prompted slice keeps its mask.
    assert found.min() == 4 and found.max() == 8
    assert np.array_equal(bounded.labels[6] == 1, unbounded.labels[6] == 1)
    # Tracking stopped at the marks: the prompt axis visited only the slices between them.
    assert bounded.frames_visited["axial forward"] == 3  # slices 6, 7, 8
    assert bounded.frames_visited["axial reverse"] == 3  # slices 6, 5, 4


def test_an_absent_slice_bounds_only_its_own_object(present_model):
    volume = _volume()
    first = Prompt(axis=0, index=6, obj_id=1, mask=_square(SHAPE[1:]))
    other = np.zeros(SHAPE[1:], bool)
    other[1:4, 1:5] = True
    second = Prompt(axis=0, index=6, obj_id=2, mask=other)
    mark = Prompt(axis=0, index=9, obj_id=1, absent=True)
    result = medsam2.segment_volume(present_model, volume, [first, second, mark], orientations=2)
    assert not result.probabilities[1][9:].any()
    assert result.probabilities[2][10:].any()  # object 2 was tracked on past slice 9
    assert result.frames_visited["axial forward"] == SHAPE[0] - 6


def test_absent_prompts_cross_the_wire():
    mark = Prompt(axis=2, index=5, obj_id=3, absent=True)
    back = decode_prompt(encode_prompt(mark), 1 << 20)
    assert (back.axis, back.index, back.obj_id, back.absent) == (2, 5, 3, True)
    assert back.mask is None and back.box is None and back.points is None
    assert "absent" not in encode_prompt(Prompt(axis=0, index=1, box=(0, 0, 2, 2)))
    with pytest.raises(InputError, match="'absent' must be true or false"):
        decode_prompt({"axis": 0, "index": 1, "absent": "yes"}, 1 << 20)


def test_the_upstream_pipeline_is_bounded_too(present_model):
    volume = _volume()
    prompt = Prompt(axis=0, index=6, box=(6, 5, 16, 12))
    free = medsam2.segment_volume(present_model, volume, [prompt], pipeline="upstream")
    assert np.flatnonzero(free.labels.any(axis=(1, 2))).max() > 9
    mark = Prompt(axis=0, index=9, absent=True)
    bounded = medsam2.segment_volume(present_model, volume, [prompt, mark], pipeline="upstream")
    assert not bounded.labels[9:].any() and not bounded.probabilities[1][9:].any()
    np.testing.assert_array_equal(bounded.labels[:9], free.labels[:9])
