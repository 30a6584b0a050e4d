"""Tracking with the previous slice's box (``ModelConfig.tracking_box_margin``, the medsam2-lite layout).

The box comes from the neighbour just processed (the previous frame going forward, the next one in reverse),
is grown by the margin and clipped; unrelated images (``Session(consecutive=False)``) get the box of the
nearest prompted frame; models without a margin track from memory alone. Runs the tiny random-weight SAM 2.1
model of the golden files.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from golden import golden_model, recorded_tracking_prompts

import medsam2

T, H, W = 6, 24, 32


@pytest.fixture()
def box_model() -> medsam2.SAM2Model:
    model = golden_model(presence_shift=5.0)
    model.config = model.config.replace(tracking_box_margin=0.1)
    return model


def _logits(rects: list[tuple[int, int, int, int]], size: int) -> torch.Tensor:
    """``[B, 1, size, size]`` logits, +5 inside ``(y0, x0, y1, x1)`` and -5 elsewhere, one rect per row."""
    out = torch.full((len(rects), 1, size, size), -5.0)
    for i, (y0, x0, y1, x1) in enumerate(rects):
        out[i, 0, y0:y1, x0:x1] = 5.0
    return out


def test_box_is_the_mask_extent_grown_by_the_margin_and_clipped(box_model):
    s = box_model.image_size
    low = s // 4  # logits at a quarter of the input size: coordinates scale by 4
    points, labels = box_model.tracking_prompt(_logits([(2, 3, 6, 13), (0, 0, low, 2)], low))
    # Object 0: rows 2..5, cols 3..12 -> input pixels x 12..52, y 8..24; longer side 40 -> grown by 4.
    torch.testing.assert_close(points[0], torch.tensor([[8.0, 4.0], [56.0, 28.0]]))
    # Object 1 touches the image border and is clipped there; a narrow mask still grows by the side rule.
    grow = 0.1 * s
    torch.testing.assert_close(points[1], torch.tensor([[0.0, 0.0], [8.0 + grow, float(s)]]))
    assert labels.tolist() == [[2, 3], [2, 3]]


def test_small_masks_grow_by_at_least_two_pixels(box_model):
    s = box_model.image_size
    points, _ = box_model.tracking_prompt(_logits([(10, 10, 11, 11)], s))
    torch.testing.assert_close(points[0], torch.tensor([[8.0, 8.0], [13.0, 13.0]]))


def test_no_box_without_margin_previous_frame_or_object(box_model):
    s = box_model.image_size
    assert box_model.tracking_prompt(None) is None
    assert box_model.lost_objects(None) is None
    # An object whose previous mask is empty is lost; its placeholder box is the whole image.
    previous = torch.cat([_logits([(1, 1, 5, 5)], s), -torch.ones(1, 1, s, s)])
    assert box_model.lost_objects(previous).tolist() == [False, True]
    points, _ = box_model.tracking_prompt(previous)
    torch.testing.assert_close(points[1], torch.tensor([[0.0, 0.0], [float(s), float(s)]]))
    box_model.config = box_model.config.replace(tracking_box_margin=None)
    assert box_model.tracking_prompt(_logits([(1, 1, 5, 5)], s)) is None
    assert box_model.lost_objects(previous) is None


@pytest.mark.parametrize("reverse", [False, True])
def test_session_prompts_each_tracked_frame_with_its_neighbours_box(box_model, reverse):
    frames = np.random.default_rng(0).random((T, H, W)).astype(np.float32)
    start = T - 1 if reverse else 0
    session = medsam2.Session(box_model, frames)
    mask = np.zeros((H, W), bool)
    mask[6:14, 8:20] = True
    session.add_prompt(start, mask=mask)
    calls = recorded_tracking_prompts(box_model)
    results = dict(session.propagate(start=start, reverse=reverse))
    assert len(calls) == T - 1
    track = session.tracks[1]
    order = list(range(start, -1, -1)) if reverse else list(range(T))
    for t, prompts in zip(order[1:], calls):
        neighbour = (
            track.conditioning.get(t + (1 if reverse else -1)) or track.tracked[t + (1 if reverse else -1)]
        )
        _assert_same_prompts(prompts, box_model.tracking_prompts(neighbour.low_res_logits))
    # The first tracked frame's box is the prompt mask's, mapped to input pixels and grown.
    first = calls[0][0][0][0]
    scale = box_model.image_size / np.array([W, H])
    assert first[0, 0] < 8 * scale[0] and first[1, 0] > 20 * scale[0] - 1
    assert sorted(results) == sorted(order)


def test_unrelated_images_get_the_box_of_the_nearest_prompted_frame(box_model):
    frames = np.random.default_rng(0).random((T, H, W)).astype(np.float32)
    session = medsam2.Session(box_model, frames, consecutive=False)
    mask = np.zeros((H, W), bool)
    mask[6:14, 8:20] = True
    session.add_prompt(0, mask=mask)
    corner = np.zeros((H, W), bool)
    corner[:5, :6] = True
    session.add_prompt(T - 1, mask=corner)
    calls = recorded_tracking_prompts(box_model)
    list(session.propagate())
    track = session.tracks[1]
    assert len(calls) == T - 2
    for t, prompts in zip(range(1, T - 1), calls):
        nearest = 0 if t < (T - 1) / 2 else T - 1
        _assert_same_prompts(prompts, box_model.tracking_prompts(track.conditioning[nearest].low_res_logits))


def _assert_same_prompts(got: list | None, expected: list | None) -> None:
    assert (got is None) == (expected is None)
    assert len(got or []) == len(expected or [])
    for (points, labels), (want_points, want_labels) in zip(got or [], expected or []):
        torch.testing.assert_close(points, want_points)
        torch.testing.assert_close(labels, want_labels)


def _absent_box_session() -> tuple[medsam2.SAM2Model, medsam2.Session, np.ndarray]:
    """A box-tracking model whose every tracked frame comes back absent, and a session with a mask prompt on
    frame 0."""
    model = golden_model(presence_shift=-50.0)
    model.config = model.config.replace(tracking_box_margin=0.1)
    frames = np.random.default_rng(0).random((T, H, W)).astype(np.float32)
    session = medsam2.Session(model, frames)
    mask = np.zeros((H, W), bool)
    mask[6:14, 8:20] = True
    session.add_prompt(0, mask=mask)
    return model, session, mask


def test_a_lost_object_stays_absent_without_encoding_its_frames():
    """Once the previous mask is empty the box model has no box: later frames are neither encoded nor decoded."""
    model, session, mask = _absent_box_session()
    calls = recorded_tracking_prompts(model)
    results = dict(session.propagate())
    assert len(calls) == 1  # frame 1 is decoded (and found absent); frames 2.. are lost
    assert session.frames_encoded == 2
    for t in range(1, T):
        assert (results[t][1] <= 0).all()
    track = session.tracks[1]
    assert all(track.tracked[t].memory is None for t in range(2, T))
    # SAM 2's recent-frames rule skips the lost frames' missing memories after a correction further on.
    session.add_prompt(T - 2, mask=mask)
    results = dict(session.propagate(start=T - 2))
    assert results[T - 2][1].max() > 0


def test_track_replaces_only_the_lost_objects_of_a_batch(box_model):
    s = box_model.image_size
    image = torch.rand(1, 3, s, s).expand(2, -1, -1, -1)
    features = box_model.encode_image(image)
    previous = torch.cat([_logits([(1, 1, 9, 9)], s // 4), -torch.ones(1, 1, s // 4, s // 4)])
    with torch.no_grad():
        tracked = box_model.track(features, None, previous)
        alone = box_model.predict(
            box_model.encode_image(image[:1]), None, points=box_model.tracking_prompt(previous[:1])
        )
    torch.testing.assert_close(tracked.low_res_logits[:1], alone.low_res_logits, atol=1e-4, rtol=1e-4)
    assert (tracked.low_res_logits[1] <= -1000).all() and (tracked.candidate_logits[1] <= -1000).all()
    assert tracked.object_score[1].item() < 0 and tracked.iou[1].item() == 0
    assert tracked.lost.tolist() == [False, True]
    torch.testing.assert_close(tracked.obj_ptr[1], box_model.no_obj_ptr[0])


def test_a_guided_frame_is_tracked_with_its_guide_box_and_is_never_lost():
    """``Session.add_guide``: the guide's box, grown by the margin, replaces the neighbour's box, also for an
    object whose neighbour came back empty; unguided frames keep the neighbour's box (here: none, lost)."""
    model, session, _ = _absent_box_session()
    session.add_guide(3, obj_id=1, box=(4, 2, 12, 10))
    calls = recorded_tracking_prompts(model)
    list(session.propagate())
    # Frame 1 is decoded from the prompt's box and found absent, frame 2 is lost, frame 3 has its guide.
    assert len(calls) == 2
    sx, sy = model.image_size / W, model.image_size / H
    x0, y0, x1, y1 = 4 * sx, 2 * sy, 12 * sx, 10 * sy
    grow = 0.1 * max(x1 - x0, y1 - y0)
    expected = torch.tensor([[x0 - grow, y0 - grow], [x1 + grow, y1 + grow]]).clamp(0, model.image_size)
    torch.testing.assert_close(calls[1][0][0][0], expected)
    assert session.frames_encoded == 3  # frames 0, 1 and 3


def test_guides_need_a_prompted_object_and_models_without_a_margin_ignore_them(box_model):
    frames = np.random.default_rng(0).random((T, H, W)).astype(np.float32)
    session = medsam2.Session(box_model, frames)
    with pytest.raises(medsam2.InputError, match="no prompt"):
        session.add_guide(1, obj_id=1, box=(1, 1, 5, 5))
    mask = np.zeros((H, W), bool)
    mask[6:14, 8:20] = True
    session.add_prompt(0, mask=mask)
    with pytest.raises(medsam2.InputError, match="outside"):
        session.add_guide(T, obj_id=1, box=(1, 1, 5, 5))
    with pytest.raises(medsam2.InputError, match="box"):
        session.add_guide(1, obj_id=1, box=(5, 5, 1, 1))
    memory_only = golden_model(presence_shift=5.0)
    guided, plain = medsam2.Session(memory_only, frames), medsam2.Session(memory_only, frames)
    for s in (guided, plain):
        s.add_prompt(0, mask=mask)
    guided.add_guide(2, obj_id=1, box=(0, 0, 4, 4))
    for (_, a), (_, b) in zip(guided.propagate(), plain.propagate()):
        np.testing.assert_array_equal(a[1], b[1])


def test_the_pieces_of_a_mask_are_its_eight_connected_parts_holding_a_tenth_of_it_largest_first():
    from medsam2.model.pieces import piece_boxes

    mask = torch.zeros(2, 20, 30, dtype=torch.bool)
    mask[0, 2:8, 2:8] = True  # 36 px
    mask[0, 8:10, 8:10] = True  # touches the first at a corner only: the same piece
    mask[0, 12:18, 20:28] = True  # 48 px: the largest
    mask[0, 0, 29] = True  # a speck, under a tenth of the mask
    mask[1, 5:9, 5:9] = True
    assert piece_boxes(mask) == [[(20, 12, 28, 18), (2, 2, 10, 10)], [(5, 5, 9, 9)]]
    assert piece_boxes(torch.zeros(1, 4, 4, dtype=torch.bool)) == [[]]


def test_each_piece_of_the_previous_mask_gets_its_box_and_the_masks_are_united(box_model):
    """Object 0's previous mask is in two pieces, object 1's in one: two prompts, object 0's two pieces'
    boxes (each grown as a mask of its own would be), object 1's one box in both; the tracked mask of
    object 0 is the union of what each box gives alone."""
    s = box_model.image_size
    low = s // 4
    previous = _logits([(2, 2, 6, 6), (2, 2, 6, 6)], low)
    previous[0, 0, 9:13, 10:16] = 5.0  # 24 px against 16: the largest piece
    prompts = box_model.tracking_prompts(previous)
    assert len(prompts) == 2
    largest = box_model.tracking_prompt(_logits([(9, 10, 13, 16)], low))
    second = box_model.tracking_prompt(_logits([(2, 2, 6, 6)], low))
    whole = box_model.tracking_prompt(previous)
    torch.testing.assert_close(prompts[0][0][0], largest[0][0])
    torch.testing.assert_close(prompts[1][0][0], second[0][0])
    for points, labels in prompts:
        torch.testing.assert_close(points[1], whole[0][1])
        assert labels.tolist() == [[2, 3], [2, 3]]
    assert box_model.tracking_prompts(_logits([(2, 2, 6, 6)], low))[0][0].tolist() == (
        box_model.tracking_prompt(_logits([(2, 2, 6, 6)], low))[0].tolist()
    )

    image = torch.rand(1, 3, s, s)
    features = box_model.encode_image(image).expand(2)
    with torch.no_grad():
        tracked = box_model.track(features, None, previous)
        alone = [box_model.predict(features, None, points=p) for p in prompts]
    expected = torch.maximum(alone[0].low_res_logits, alone[1].low_res_logits)
    torch.testing.assert_close(tracked.low_res_logits, expected)
    torch.testing.assert_close(
        tracked.object_score, torch.maximum(alone[0].object_score, alone[1].object_score)
    )
    torch.testing.assert_close(
        tracked.candidate_logits, torch.maximum(alone[0].candidate_logits, alone[1].candidate_logits)
    )
