"""The presence head (medsam2.model.presence) in tracking, and its fitting (medsam2.train.presence)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from golden import box_tracking_model, golden_model

import medsam2
import medsam2.model.sam2
from medsam2.model.presence import CUE_NAMES, PresenceHead, Region, region_descriptor, typical_cells
from medsam2.model.sam2 import PROMPTED_OBJECT_LOGIT
from medsam2.train.presence import Run, fit, head_off, load_runs, save_runs, stop_errors

T, H, W = 8, 24, 24


def test_region_descriptor_averages_the_embedding_under_the_mask():
    embedding = torch.zeros(2, 3, 4, 4)
    embedding[:, 0, :2, :2] = 2.0  # the top-left quarter points along channel 0
    embedding[:, 1, 2:, 2:] = 5.0  # the bottom-right one along channel 1
    logits = -torch.ones(2, 1, 16, 16)
    logits[0, 0, :8, :8] = 1.0
    logits[1, 0, 8:, 8:] = 1.0
    descriptor = region_descriptor(embedding, logits)
    torch.testing.assert_close(descriptor, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
    assert region_descriptor(embedding, -torch.ones(1, 1, 16, 16))[0].abs().sum() == 0


def _region(direction: list[float], mean: float, spread: float) -> Region:
    return Region(torch.tensor([direction]), torch.tensor([[mean, spread]]), torch.tensor([[mean, spread]]))


def test_cues_take_the_most_alike_prompt_and_stand_in_for_a_missing_previous_frame():
    region = _region([1.0, 0.0], 0.5, 0.1)
    prompts = [_region([0.0, 1.0], 0.45, 0.05), _region([0.6, 0.8], 0.9, 0.15)]
    iou, area = torch.tensor([0.9]), torch.tensor([99.0])
    cues = PresenceHead.cues(region, prompts, None, iou, area, None)
    # most similar prompt: 0.6; smallest intensity change: |0.5 - 0.45| / (0.05 + 0.05) = 0.5
    torch.testing.assert_close(cues, torch.tensor([[0.6, 0.6, 0.9, 0.0, 0.5, 0.5]]))
    previous = _region([0.0, 1.0], 0.2, 0.25)
    cues = PresenceHead.cues(region, prompts, previous, torch.tensor([0.5]), torch.tensor([49.0]), area)
    torch.testing.assert_close(cues, torch.tensor([[0.6, 0.0, 0.5, float(np.log(0.5)), 0.5, 1.0]]))


def test_a_region_holds_the_intensity_under_its_mask():
    image = torch.zeros(1, 3, 32, 32)
    image[:, :, :16] = 1.0  # the top half is bright
    features = medsam2.model.sam2.ImageFeatures(
        torch.ones(1, 2, 8, 8), torch.zeros(1, 2, 8, 8), None, torch.nn.functional.avg_pool2d(image[:, :1], 4)
    )
    logits = -torch.ones(1, 1, 32, 32)
    logits[..., 8:24, :] = 1.0  # half bright, half dark
    region = Region.of(features, logits)
    torch.testing.assert_close(region.intensity, torch.tensor([[0.5, 0.5]]))
    emptied = region.emptied(torch.tensor([True]))
    assert emptied.intensity.abs().sum() == 0 and emptied.descriptor.abs().sum() == 0
    assert emptied.typical.isnan().all()


def test_typical_intensity_is_the_median_and_absolute_deviation_of_the_covered_cells():
    intensity = torch.tensor([[0.2, 0.3, 0.3, 0.9]]).reshape(1, 1, 2, 2)
    features = medsam2.model.sam2.ImageFeatures(
        torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), None, intensity
    )
    logits = torch.ones(1, 1, 8, 8)
    logits[..., 4:, 4:] = -1.0  # the 0.9 cell is not covered
    torch.testing.assert_close(Region.of(features, logits).typical, torch.tensor([[0.3, 0.0]]))
    assert Region.of(features, -torch.ones(1, 1, 8, 8)).typical.isnan().all()


def test_typical_cells_are_those_within_the_robust_spreads_of_some_prompted_region():
    intensity = torch.tensor([0.0, 0.3, 0.65, 0.75, 0.95]).reshape(1, 1, 1, 5)

    def region(median: float, mad: float) -> Region:
        return Region(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[median, mad]]))

    # 4 x 1.4826 x 0.1 = 0.593 either side of 0.3
    assert typical_cells(intensity, [region(0.3, 0.1)], 4.0).flatten().tolist() == [1, 1, 1, 1, 0]
    # a narrow region keeps 4 x the spread floor, 0.1, either side
    lung = region(0.3, 0.02)
    assert typical_cells(intensity, [lung], 4.0).flatten().tolist() == [1, 1, 1, 0, 0]
    saturated = region(1.0, 0.0)  # contrast-filled blood clipped at 1
    assert typical_cells(intensity, [saturated], 4.0).flatten().tolist() == [0, 0, 1, 1, 1]
    assert typical_cells(intensity, [lung, saturated], 4.0).all()
    empty = Region(torch.zeros(1, 2), torch.zeros(1, 2), torch.full((1, 2), float("nan")))
    assert typical_cells(intensity, [lung, empty], 4.0).all()


def test_a_tracked_mask_keeps_the_typical_cells_and_the_holes_they_enclose():
    """Only the left half of the predicted mask has the object's intensity; an atypical spot inside it (a
    vessel in a lung) stays, the atypical right half (the liver under it) goes."""
    intensity = torch.full((1, 1, 8, 8), 0.3)
    intensity[..., 4:] = 0.9
    intensity[..., 3, 2] = 0.9
    features = medsam2.model.sam2.ImageFeatures(
        torch.ones(1, 2, 8, 8), torch.zeros(1, 2, 8, 8), None, intensity
    )
    model = box_tracking_model()
    model.config = model.config.replace(typical_intensity_spreads=4.0)
    logits = torch.full((1, 1, 32, 32), -5.0)
    logits[..., 4:28, 4:28] = 5.0
    prediction = medsam2.model.sam2.MaskPrediction(
        logits, logits.clone(), torch.ones(1), torch.zeros(1, 4), torch.ones(1, 1)
    )
    prompted = Region(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[0.3, 0.01]]))
    kept = model.keep_typical(prediction, features, [prompted])
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[4:28, 4:16] = True
    assert torch.equal(kept.low_res_logits[0, 0] > 0, expected)
    assert torch.equal(kept.high_res_logits[0, 0] > 0, expected)
    torch.testing.assert_close(kept.region.typical, torch.tensor([[0.3, 0.0]]))


def test_tracking_stops_where_the_object_s_intensity_is_gone():
    """A bright object on the first half of the frames, none on the rest: with the typical-intensity cut the
    tracked mask empties on the first frame without it and the box chain ends; without it the (always
    present) tiny model keeps drawing a mask in the chained box."""
    frames = np.full((T, H, W), 0.2, np.float32)
    frames[:, :, 0], frames[:, :, -1] = 0.0, 1.0  # each frame spans the same range before min-max scaling
    frames[:4, 6:16, 5:17] = 0.8
    mask = np.zeros((H, W), bool)
    mask[6:16, 5:17] = True
    results = {}
    for spreads in (None, 4.0):
        model = _with_head(box_tracking_model(), [0.0] * len(CUE_NAMES), 10.0)
        model.config = model.config.replace(typical_intensity_spreads=spreads)
        session = medsam2.Session(model, frames)
        session.add_prompt(0, mask=mask)
        results[spreads] = {t: logits[1] > 0 for t, logits in session.propagate()}
    assert all(results[None][t].any() for t in range(4, T))
    assert all(not results[4.0][t].any() for t in range(4, T))
    # While the object is there, the kept mask lies on it (the tiny model's own masks spill far off it).
    assert not any((results[4.0][t] & ~mask).any() for t in range(1, 4))
    assert any((results[4.0][t] & mask).any() for t in range(1, 4))
    assert any((results[None][t] & ~mask).any() for t in range(1, 4))


def _frames() -> np.ndarray:
    frames = np.full((T, H, W), 0.1, np.float32)
    frames[:, 6:16, 5:17] = 0.9
    return frames


def _with_head(model: medsam2.SAM2Model, weight: list[float], bias: float) -> medsam2.SAM2Model:
    model.config = model.config.replace(presence_head=True)
    model.presence_head = PresenceHead()
    with torch.no_grad():
        model.presence_head.weight.copy_(torch.tensor(weight))
        model.presence_head.bias.fill_(bias)
    return model


def _track(model: medsam2.SAM2Model) -> tuple[dict[int, np.ndarray], medsam2.Session]:
    session = medsam2.Session(model, _frames())
    session.add_prompt(0, box=(5, 6, 17, 16))
    return {t: logits[1] for t, logits in session.propagate()}, session


def test_a_head_that_calls_everything_present_changes_nothing():
    plain, _ = _track(box_tracking_model())
    judged, session = _track(_with_head(box_tracking_model(), [0.0] * len(CUE_NAMES), 10.0))
    for t in range(T):
        np.testing.assert_array_equal(plain[t], judged[t])
    assert all(session.tracks[1].tracked[t].region is not None for t in range(1, T))


def test_an_object_judged_absent_ends_the_box_chain():
    """The first tracked frame is judged absent (its similarity to the prompt is below the head's threshold):
    its mask is emptied and its pointer is the no-object one, and the box chain has lost it after that."""
    model = _with_head(box_tracking_model(), [1.0, 0, 0, 0, 0, 0], -2.0)  # similarity is at most 1
    results, session = _track(model)
    assert (results[0] > 0).any()
    track = session.tracks[1]
    assert track.tracked[1].object_score <= -1.0
    torch.testing.assert_close(track.tracked[1].obj_ptr, model.no_obj_ptr)
    for t in range(1, T):
        assert (results[t] <= 0).all()


def _synthetic_runs(rng: np.random.Generator, n: int = 60) -> list[Run]:
    """Runs whose first cue is high while the structure is there and low after its end."""
    runs = []
    for i in range(n):
        inside, past = int(rng.integers(3, 12)), 4
        present = np.r_[np.ones(inside, bool), np.zeros(past, bool)]
        cues = rng.normal(0, 0.05, (len(present), len(CUE_NAMES)))
        cues[:, 0] += np.where(present, 0.9, 0.4)
        runs.append(Run("synthetic", f"s{i}", 0, bool(i % 2), cues, present))
    return runs


def test_fit_learns_the_separating_cue_and_stops_runs_at_the_end():
    runs = _synthetic_runs(np.random.default_rng(0))
    weight, bias, report = fit(runs, early_stop_rate=0.05)
    assert weight[0] > 5 * np.abs(weight[1:]).max()
    errors = stop_errors(runs, weight, bias)
    assert (errors < 0).mean() <= 0.05
    assert (errors == 0).mean() > 0.9
    assert report["stop_error_slices"]["within_2"] > 0.9
    # The head switched off lets every run go on to its last slice.
    assert (stop_errors(runs, np.zeros(len(CUE_NAMES)), 10.0) == 4).all()


def test_runs_round_trip_through_a_plain_npz(tmp_path):
    runs = _synthetic_runs(np.random.default_rng(1), n=5)
    save_runs(tmp_path / "runs.npz", runs)
    loaded = load_runs(tmp_path / "runs.npz")
    assert [(r.structure, r.reverse) for r in loaded] == [(r.structure, r.reverse) for r in runs]
    for a, b in zip(loaded, runs):
        np.testing.assert_array_equal(a.cues, b.cues)
        np.testing.assert_array_equal(a.present, b.present)


def test_head_off_records_the_cues_and_restores_the_head():
    model = _with_head(box_tracking_model(), [1.0, 0, 0, 0, 0, 0], -2.0)
    with head_off(model) as captured:
        results, _ = _track(model)
    assert len(captured) == T - 1 and captured[0].shape == (1, len(CUE_NAMES))
    assert all((results[t] > 0).any() for t in range(T))  # nothing was called absent meanwhile
    assert model.presence_head.bias.item() == pytest.approx(-2.0)


def test_a_users_box_or_positive_click_keeps_the_object_where_prompts_assert_presence():
    """medsam2-lite trusts the clinician's prompt on its frame; SAM 2 (the flag off) lets the score decide."""
    rng = np.random.default_rng(0)
    frames = rng.random((3, 48, 48)).astype(np.float32)
    box = (10, 12, 30, 34)
    answers = {}
    for trusted in (False, True):
        model = golden_model(presence_shift=-20.0)  # every object scored absent
        model.config = model.config.replace(prompts_assert_presence=trusted)
        session = medsam2.Session(model, frames)
        boxed = session.add_prompt(0, box=box)
        clicked = session.add_prompt(1, obj_id=2, points=[[20, 20]], labels=[1])
        negative = session.add_prompt(2, obj_id=3, points=[[20, 20]], labels=[0])
        score = float(session.tracks[1].pending[0].object_score)
        tracked = dict(session.propagate(start=0))[1]
        answers[trusted] = (boxed, clicked, negative, score, tracked)
    boxed, clicked, negative, score, tracked = answers[True]
    assert (boxed > 0).any() and (clicked > 0).any() and score >= PROMPTED_OBJECT_LOGIT
    assert not (negative > 0).any()  # a negative click alone says nothing is there
    assert not (tracked[1] > 0).any()  # frames the user did not prompt are still the score's to decide
    boxed, clicked, _, score, _ = answers[False]
    assert not (boxed > 0).any() and not (clicked > 0).any() and score < 0


def test_fitting_refuses_weights_without_their_provenance_json_before_collecting(tmp_path):
    """The head's record goes into the JSON beside ``--weights``; a missing one is reported at once, not after
    the collection (minutes to hours of tracking runs), and nothing is written."""
    from medsam2.train import main

    weights = tmp_path / "scratch.safetensors"
    weights.write_bytes(b"not read")
    with pytest.raises(SystemExit, match="scratch.json not found"):
        main(["presence", "--workdir", str(tmp_path / "work"), "--weights", str(weights)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scratch.safetensors", "work"]
    assert not any((tmp_path / "work").iterdir())
