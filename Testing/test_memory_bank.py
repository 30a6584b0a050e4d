"""MedSAM-2's self-sorting memory bank (medsam2.memory): admission, dissimilarity sorting, similarity
resampling, temporal slots, the ablation switches, and reproducibility through the session's seed.

The unit tests drive the policy with hand-made frame records; the session tests run the tiny random-weight
SAM 2.1 model of the golden files, with its presence head shifted so that the object is tracked as present
(the random model alone predicts it absent, and absent frames never enter the bank).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from golden import golden_config
from scipy import stats

import medsam2
from medsam2.memory import FrameRecord, ObjectTrack, SelfSortingBank, most_dissimilar
from medsam2.model.sam2 import Memory

CONFIG = golden_config()
PROMPTED_SLOT = CONFIG.num_maskmem - 1
POINTER_RANGE_40 = min(40, CONFIG.max_obj_ptrs_in_encoder) - 1


def _unit(rng: np.random.Generator, n: int, dim: int) -> torch.Tensor:
    v = torch.from_numpy(rng.normal(size=(n, dim))).float()
    return v / v.norm(dim=1, keepdim=True)


def _with_cosines(cosines: list[float], dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A unit query ``e_0`` and unit vectors whose cosine similarity to it is exactly ``cosines``."""
    eye = torch.eye(dim)
    rows = [c * eye[0] + (1 - c * c) ** 0.5 * eye[i + 1] for i, c in enumerate(cosines)]
    return eye[0], torch.stack(rows)


def _record(frame: int, descriptor: torch.Tensor, iou: float = 0.9, object_score: float = 1.0) -> FrameRecord:
    return FrameRecord(
        frame=frame,
        low_res_logits=torch.zeros(1, 1, 4, 4),
        obj_ptr=torch.full((1, CONFIG.hidden_dim), float(frame)),
        object_score=object_score,
        iou=iou,
        memory=Memory(torch.zeros(1, CONFIG.mem_dim, 1, 1), torch.zeros(1, CONFIG.mem_dim, 1, 1)),
        descriptor=descriptor,
    )


def _bank(**options) -> SelfSortingBank:
    return SelfSortingBank(CONFIG, medsam2.MemoryOptions(**options))


def _dissimilarities(descriptors: torch.Tensor) -> np.ndarray:
    """D_i = sum over j != i of (1 - cos(E_i, E_j)), written out pair by pair."""
    e = descriptors.double().numpy()
    n = len(e)
    return np.array([sum(1 - e[i] @ e[j] for j in range(n) if j != i) for i in range(n)])


# ---------------------------------------------------------------- admission (Eq. 2)


def test_low_confidence_and_absent_frames_never_enter_the_bank():
    policy, track = _bank(confidence_threshold=0.5), ObjectTrack(1)
    rng = np.random.default_rng(0)
    d = _unit(rng, 4, 8)
    policy.observe(track, _record(1, d[0], iou=0.49))
    policy.observe(track, _record(2, d[1], object_score=0.0))
    policy.observe(track, _record(3, d[2], object_score=-3.0, iou=0.99))
    assert track.bank == []
    policy.observe(track, _record(4, d[3], iou=0.5))  # the threshold itself is confident enough
    assert [r.frame for r in track.bank] == [4]


def test_a_full_bank_ignores_unconfident_frames_even_if_they_are_very_dissimilar():
    policy, track = _bank(capacity=2), ObjectTrack(1)
    query, near = _with_cosines([0.99, 0.98])
    for frame, d in enumerate(near):
        policy.observe(track, _record(frame, d))
    policy.observe(track, _record(9, -query, iou=0.2))  # opposite to the rest: the most dissimilar of all
    assert [r.frame for r in track.bank] == [0, 1]


# ---------------------------------------------------------------- dissimilarity sorting (Eq. 3)


@pytest.mark.parametrize("n", [3, 5, 7, 8])
def test_most_dissimilar_keeps_the_k_largest_total_dissimilarities(n):
    """The paper's rule: D_i over the candidate set, keep the K largest; brute force over all K-subsets
    of the objective sum_{i in S} D_i (whose maximiser is exactly that top K)."""
    rng = np.random.default_rng(n)
    for trial in range(5):
        descriptors = _unit(rng, n, 4)
        dissimilarity = _dissimilarities(descriptors)
        for k in range(1, n):
            best = max(itertools.combinations(range(n), k), key=lambda s: dissimilarity[list(s)].sum())
            assert most_dissimilar(descriptors, k) == list(best), f"n={n} k={k} trial={trial}"


@pytest.mark.parametrize("k", [1, 2, 4, 6])
def test_dropping_one_candidate_maximises_the_dissimilarity_within_the_kept_set(k):
    """The bank only ever holds capacity + 1 candidates; then the top-K rule also maximises the total
    pairwise dissimilarity inside the kept set (removing r loses exactly D_r of the candidate total)."""
    rng = np.random.default_rng(10 + k)
    for _ in range(10):
        descriptors = _unit(rng, k + 1, 5)
        dissimilarity = 1 - descriptors.double().numpy() @ descriptors.double().numpy().T
        best = max(
            itertools.combinations(range(k + 1), k),
            key=lambda s: sum(dissimilarity[i, j] for i, j in itertools.combinations(s, 2)),
        )
        assert most_dissimilar(descriptors, k) == list(best)


def test_bank_update_keeps_the_most_dissimilar_of_bank_and_newcomer_at_every_step():
    capacity = 4
    policy, track = _bank(capacity=capacity), ObjectTrack(1)
    descriptors = _unit(np.random.default_rng(3), 15, 6)
    for frame, d in enumerate(descriptors):
        candidates = [*(r.frame for r in track.bank), frame]
        policy.observe(track, _record(frame, d))
        if len(candidates) <= capacity:
            expected = candidates
        else:
            dissimilarity = _dissimilarities(descriptors[candidates])
            keep = np.argsort(-dissimilarity, kind="stable")[:capacity]
            expected = [candidates[i] for i in sorted(keep)]
        assert [r.frame for r in track.bank] == expected, f"after frame {frame}"
    # The rule is not "most recent": some early frame survived to the end.
    assert min(r.frame for r in track.bank) < len(descriptors) - capacity


def test_sorting_prefers_a_distinct_frame_over_near_duplicates():
    policy, track = _bank(capacity=2), ObjectTrack(1)
    query, rows = _with_cosines([0.999, 0.998, 0.0])
    duplicate_a, duplicate_b, distinct = rows
    for frame, d in enumerate([distinct, duplicate_a, duplicate_b]):
        policy.observe(track, _record(frame, d))
    frames = [r.frame for r in track.bank]
    assert 0 in frames and len(frames) == 2


# ---------------------------------------------------------------- resampling (Eqs. 4-5)


def _draw_counts(cosines: list[float], draws: int = 20_000, seed: int = 0) -> np.ndarray:
    query, rows = _with_cosines(cosines)
    policy = _bank(capacity=draws)
    bank = [_record(i, d) for i, d in enumerate(rows)]
    drawn = policy.draw(bank, query, torch.Generator().manual_seed(seed))
    assert len(drawn) == draws
    return np.bincount([r.frame for r in drawn], minlength=len(bank))


def test_resampling_frequencies_follow_the_similarities():
    cosines = [0.6, 0.3, 0.1, 0.45]
    counts = _draw_counts(cosines)
    expected = np.array(cosines) / sum(cosines) * counts.sum()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < stats.chi2.ppf(0.999, df=len(cosines) - 1), (counts, expected)
    # A uniform draw would be far off: the test can tell the two apart.
    uniform = np.full(len(cosines), counts.sum() / len(cosines))
    assert float(((counts - uniform) ** 2 / uniform).sum()) > 100


def test_negative_similarities_are_never_drawn():
    counts = _draw_counts([0.5, -0.4, 0.2, -0.9, 0.0])
    assert counts[1] == counts[3] == counts[4] == 0
    assert abs(counts[0] / counts.sum() - 0.5 / 0.7) < 0.02


def test_uniform_draws_when_no_entry_is_similar():
    counts = _draw_counts([-0.2, 0.0, -0.7])
    expected = np.full(3, counts.sum() / 3)
    assert float(((counts - expected) ** 2 / expected).sum()) < stats.chi2.ppf(0.999, df=2), counts


def test_same_generator_seed_same_draws():
    cosines = [0.5, 0.4, 0.3, 0.2, 0.1, 0.05]
    first, again, other = (_draw_counts(cosines, draws=50, seed=s) for s in (7, 7, 8))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


# ---------------------------------------------------------------- the context a frame attends to


def _full_track() -> tuple[ObjectTrack, torch.Tensor]:
    """Two prompted frames (5 and 30) and a bank of frames at distances 1, 3 and 18 from frame 20."""
    query, rows = _with_cosines([0.9, 0.5, 0.2, 0.7])
    track = ObjectTrack(1)
    for t, d in [(5, rows[3]), (30, rows[3])]:
        track.conditioning[t] = _record(t, d)
    track.bank = [_record(19, rows[0]), _record(17, rows[1]), _record(2, rows[2])]
    return track, query


def test_prompted_frames_are_always_attended():
    track, query = _full_track()
    policy = _bank(capacity=3)
    cond = {id(rec.memory) for rec in track.conditioning.values()}
    for _ in range(20):  # resampling never pushes a prompted frame out
        context = policy.context(track, 20, False, 40, query)
        prompted = [(m, slot) for m, slot in context.frames if id(m) in cond]
        assert len(prompted) == 2 and all(slot == PROMPTED_SLOT for _, slot in prompted)
        assert len(context.frames) == 2 + 3


def test_temporal_slots_use_the_real_frame_distance_clipped_to_the_known_range():
    track, query = _full_track()
    policy = _bank(capacity=3, resample=False)
    context = policy.context(track, 20, False, 40, query)
    slot_of = {id(m): slot for m, slot in context.frames}
    # Distances 1 and 3 -> slots 0 and 2; distance 18 is beyond the model's num_maskmem - 1 slots: clipped.
    assert [slot_of[id(r.memory)] for r in track.bank] == [0, 2, CONFIG.num_maskmem - 2]
    # Pointers: signed distance in the tracking direction, clipped to the pointer range.
    pointer_distance = {int(ptr[0, 0]): d for d, ptr in context.pointers}
    assert pointer_distance[19] == 1 and pointer_distance[17] == 3
    assert pointer_distance[2] == min(18, POINTER_RANGE_40)
    assert pointer_distance[5] == 15  # a prompted frame before frame 20; frame 30 is ahead: no pointer
    assert 30 not in pointer_distance
    assert context.pointer_range == POINTER_RANGE_40


def test_temporal_slots_in_reverse_tracking():
    track, query = _full_track()
    track.bank = [_record(21, track.bank[0].descriptor), _record(24, track.bank[1].descriptor)]
    context = _bank(capacity=2, resample=False).context(track, 20, True, 40, query)
    slot_of = {id(m): slot for m, slot in context.frames}
    assert [slot_of[id(r.memory)] for r in track.bank] == [0, 3]
    pointer_distance = {int(ptr[0, 0]): d for d, ptr in context.pointers}
    assert pointer_distance[21] == 1 and pointer_distance[24] == 4 and pointer_distance[30] == 10


# ---------------------------------------------------------------- ablation switches


def test_without_sorting_the_bank_keeps_the_most_recent_confident_entries():
    policy, track = _bank(capacity=3, sort_by_dissimilarity=False), ObjectTrack(1)
    descriptors = _unit(np.random.default_rng(4), 12, 6)
    for frame, d in enumerate(descriptors[:10]):
        policy.observe(track, _record(frame, d))
    policy.observe(track, _record(10, descriptors[10], iou=0.1))  # not confident: ignored
    assert [r.frame for r in track.bank] == [7, 8, 9]
    sorted_policy, sorted_track = _bank(capacity=3), ObjectTrack(1)
    for frame, d in enumerate(descriptors[:10]):
        sorted_policy.observe(sorted_track, _record(frame, d))
    assert [r.frame for r in sorted_track.bank] != [7, 8, 9]


def test_without_resampling_every_entry_is_attended_once():
    track, query = _full_track()
    bank_ids = sorted(id(r.memory) for r in track.bank)
    context = _bank(capacity=3, resample=False).context(track, 20, False, 40, query)
    cond = {id(rec.memory) for rec in track.conditioning.values()}
    assert sorted(id(m) for m, _ in context.frames if id(m) not in cond) == bank_ids
    resampling = _bank(capacity=3)
    resampled = [resampling.context(track, 20, False, 40, query) for _ in range(10)]
    drawn = [sorted(id(m) for m, _ in c.frames if id(m) not in cond) for c in resampled]
    assert any(d != bank_ids for d in drawn)  # with resampling, some entries repeat and others drop out


# ---------------------------------------------------------------- in a session, with the tiny model


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:10, :24, :32]
    blob = ((y - 10 - z / 2) ** 2 / 30 + (x - 12 - z) ** 2 / 50) < 1
    return (0.2 + 0.6 * blob + rng.normal(0, 0.05, blob.shape)).clip(0, 1).astype(np.float32)


def _run(model, frames, seed: int, **options) -> tuple[medsam2.Session, dict[int, np.ndarray]]:
    session = medsam2.Session(model, frames, memory=medsam2.MemoryOptions(**options), seed=seed)
    session.add_prompt(1, mask=frames[1] > 0.5)
    return session, {t: out[1] for t, out in session.propagate()}


def test_same_seed_same_result_and_the_seed_matters(present_model, frames):
    session, first = _run(present_model, frames, seed=3)
    assert len(session.tracks[1].bank) >= 2  # the draws have a choice to make
    _, again = _run(present_model, frames, seed=3)
    assert all(np.array_equal(first[t], again[t]) for t in first)
    others = [_run(present_model, frames, seed=s)[1] for s in (4, 5)]
    assert any(not np.array_equal(first[t], other[t]) for other in others for t in first)


def test_session_bank_admits_only_confident_present_frames(present_model, frames):
    session, _ = _run(present_model, frames, seed=0, confidence_threshold=0.0)
    track = session.tracks[1]
    assert len(track.bank) == CONFIG.num_maskmem - 1
    assert all(r.present and r.frame in track.tracked for r in track.bank)
    strict, _ = _run(present_model, frames, seed=0, confidence_threshold=0.99)
    assert max(r.iou for r in strict.tracks[1].tracked.values()) < 0.99
    assert strict.tracks[1].bank == []


def test_memory_is_encoded_only_for_the_frames_that_enter_the_bank(present_model, frames):
    """Memory encoding costs about as much as decoding; a frame that never enters the bank is never
    attended, so its memory is not encoded."""
    shuffled = frames[[0, 5, 2, 8, 1, 9, 3, 7, 4, 6]]  # in a steady drift the newest frame is always kept
    session, _ = _run(present_model, shuffled, seed=0, confidence_threshold=0.0, capacity=2)
    track = session.tracks[1]
    encoded = {t for t, record in track.tracked.items() if record.memory is not None}
    assert {r.frame for r in track.bank} <= encoded
    assert len(encoded) < len(track.tracked)
    gated, _ = _run(present_model, frames, seed=0, confidence_threshold=0.99)
    assert all(record.memory is None for record in gated.tracks[1].tracked.values())
    recent, _ = _run(present_model, frames, seed=0, policy="recent")
    assert all(record.memory is not None for record in recent.tracks[1].tracked.values())


def test_session_attends_prompted_frames_and_true_distances(present_model, frames, monkeypatch):
    """Every tracked frame's real MemoryContext holds both prompted frames, and bank entries in the slot
    of their true frame distance."""
    session = medsam2.Session(present_model, frames, memory=medsam2.MemoryOptions(resample=False))
    session.add_prompt(0, mask=frames[0] > 0.5)
    session.add_prompt(5, mask=frames[5] > 0.5)
    seen = []
    original = present_model.predict

    def spy(features, context, **kwargs):
        seen.append(context)
        return original(features, context, **kwargs)

    monkeypatch.setattr(present_model, "predict", spy)
    order = [t for t, _ in session.propagate(start=0)]
    track = session.tracks[1]
    frame_of = {id(r.memory): t for t, r in track.tracked.items()}
    cond = {id(r.memory) for r in track.conditioning.values()}
    tracked_frames = [t for t in order if t not in (0, 5)]
    assert len(seen) == len(tracked_frames) == len(frames) - 2
    for t, context in zip(tracked_frames, seen):
        slots = {id(m): slot for m, slot in context.frames}
        assert {i for i in slots if i in cond} == cond and all(slots[i] == PROMPTED_SLOT for i in cond)
        for memory_id, slot in slots.items():
            if memory_id not in cond:
                assert slot == min(t - frame_of[memory_id], PROMPTED_SLOT) - 1
    assert any(len(c.frames) > 2 for c in seen)  # the bank was in use
