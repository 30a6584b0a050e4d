"""Volume segmentation: the slices as video frames, along up to six orientations, aggregated by voting.

Pass 1 tracks every object from its prompts along its prompt axis, forward and reverse. Each further axis is
seeded with a mask prompt: the first pass's result on that axis's slice of largest cross-section; the user's
prompts on that axis are added as corrections. A model that tracks with boxes (medsam2-lite) tracks each slice
of a further axis where the first pass found the object with the box of the first pass's mask there: chained
from slice to slice, a box drifts onto a neighbouring organ that the other views show next to the object
(measured on the held-out CT: the right kidney's sagittal pass followed the liver). Each axis that tracked an
object votes on every voxel: a slice its passes did not reach (past an early stop, outside the ROI) is a vote
for background, since the pass had found the object ended there. With ``roi="auto"`` an extra axis also votes
background outside the object's box: the first pass's extent plus a margin (a leak far from it must not stand
on two extra axes' votes). A voxel's probability is the mean of the votes, each axis's weighted by the model's
confidence in it (or the plain mean, or the share of positive votes), except on the slices the user prompted:
they keep what the prompt gave. The confidence weighting was chosen by measurement: on the held-out MR, whose
coronal and sagittal slices cut the abdominal organs into thin strips, the extra axes predict a lower IoU and
outweighing them raised the mean Dice of five organs by 0.03 (BENCHMARKS.md section 4). Between two prompted
slices of an object (a correction) both directions of an axis pass; the one coming from the nearer prompt
counts more (:meth:`_AxisRun.direction_weight`), so that they cannot cancel each other out (section 4g).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .absent import apply_bounds, bounds, check_absent
from .errors import Cancelled, InputError
from .feature_cache import FeatureCache
from .memory import MemoryOptions
from .model.sam2 import SAM2Model
from .preprocess import windowed_intensities
from .prompts import Prompt
from .session import Session
from .upstream import segment_volume_upstream
from .votes import Aggregation, Votes, slice_index

ProgressCallback = Callable[[int, int, str], None]
Box = tuple[slice, slice, slice]  # a [Z, Y, X] box of voxels

# A direction stops after this many consecutive frames without any object, once past every prompt.
_ABSENT_FRAMES_TO_STOP = 3
# Margin around the first pass's slice range for the extra axes: this fraction of the extent, or this many
# voxels, whichever is larger.
_ROI_MARGIN_FRACTION, _ROI_MARGIN_VOXELS = 0.15, 4
# A further axis visits at least this many slices of its ROI, however far apart that puts them.
_MIN_EXTRA_AXIS_SLICES = 8


@dataclass
class VolumeResult:
    """``labels``: ``[Z, Y, X]`` object ids (0 = background); ``probabilities``: per object ``[Z, Y, X]``
    float32 (the weighted or plain mean probability, or the fraction of positive votes); ``frames_visited``:
    model frame predictions per pass; ``frames_encoded``: image-encoder runs (a frame on which every object
    was lost is visited but not encoded); ``timings``: seconds per stage."""

    labels: np.ndarray
    probabilities: dict[int, np.ndarray]
    frames_visited: dict[str, int] = field(default_factory=dict)
    frames_encoded: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    window: tuple[float, float] | None = None


def segment_volume(
    model: SAM2Model,
    volume: np.ndarray,
    prompts: Sequence[Prompt],
    spacing: Sequence[float] | None = None,
    modality: str = "auto",
    window: str | tuple[float, float] | None = None,
    orientations: int = 6,
    aggregate: str = "confidence",
    memory: MemoryOptions | None = None,
    roi: str | None = "auto",
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    seed: int = 0,
    early_stop: bool = True,
    feature_cache: FeatureCache | None = None,
    pipeline: str = "default",
) -> VolumeResult:
    """Segment the prompted objects through a ``[Z, Y, X]`` volume (never modified).

    ``pipeline="upstream"`` runs bowang-lab's MedSAM2 inference instead (``medsam2.upstream``: their
    intensity preparation and resize, the prompt axis only, SAM 2's memory); ``modality``, ``window``,
    ``progress`` and ``cancel`` apply to it, the options of our own pipeline do not.

    ``orientations``: 1 (prompt axis, forward only), 2 (prompt axis, both directions) or 6 (all three axes,
    both directions). ``aggregate``: ``"confidence"`` (the mean probability, each axis weighted by the
    model's mean predicted IoU where that axis found the object), ``"mean"`` probability or ``"majority"``
    vote. ``roi="auto"`` lets the extra axes visit only the slices where the first pass found the objects,
    plus a margin (at least 5 mm when ``spacing``, z, y, x in mm, is given), and count their votes only
    inside each object's first-pass box plus that margin (``None``: every slice, every vote). It also visits
    the extra axes' slices a step apart, so that their four orientations together predict no more frames
    than the first pass did (and, with ``spacing``, at least as far apart in mm as the prompt axis's
    slices); the slices between get interpolated votes. The model always sees whole slices, as in training.
    ``early_stop`` ends a direction once every object has been absent for a few slices past the prompts.
    Prompts with ``absent=True`` bound their object: it is background on the slices its other prompts cannot
    reach without crossing one (:mod:`medsam2.absent`), and a direction ends once it has passed every slice
    its objects may reach.
    ``progress(done, total, message)`` is called as frames complete; setting ``cancel`` stops within one
    frame with :class:`Cancelled`. ``feature_cache`` keeps the slices' image features for later runs on the
    same volume, model and intensity window (a correction, another object), which then skip encoding them.
    """
    started = time.perf_counter()
    volume = _checked_volume(volume)
    prompts = _checked_prompts(prompts, volume.shape)
    absent = bounds(prompts, volume.shape)
    prompts = [p for p in prompts if not p.absent]
    if pipeline == "upstream":
        result = segment_volume_upstream(model, volume, prompts, modality, window, progress, cancel)
        if absent:
            apply_bounds(result.probabilities, absent)
            result.labels = _labels(result.probabilities, sorted(result.probabilities))
        return result
    if pipeline != "default":
        raise InputError(f"pipeline must be 'default' or 'upstream', got {pipeline!r}")
    if orientations not in (1, 2, 6):
        raise InputError(f"orientations must be 1, 2 or 6, got {orientations!r}")
    try:
        aggregation = Aggregation(aggregate)
    except ValueError:
        choices = ", ".join(repr(a.value) for a in Aggregation)
        raise InputError(f"aggregate must be one of {choices}, got {aggregate!r}") from None
    if roi not in ("auto", None):
        raise InputError(f"roi must be 'auto' or None, got {roi!r}")
    if spacing is not None:
        spacing = _checked_spacing(spacing)
    memory = memory or MemoryOptions()
    intensities, window_used = windowed_intensities(volume, modality=modality, window=window)
    obj_ids = sorted({p.obj_id for p in prompts})
    votes = Votes(volume.shape, obj_ids, aggregation)
    result = VolumeResult(np.zeros(volume.shape, np.uint8), {}, window=window_used)
    result.timings["prepare"] = time.perf_counter() - started
    runner = _PassRunner(model, intensities, memory, seed, votes, result, progress, cancel, early_stop)
    if feature_cache is not None:
        runner.share_features(feature_cache)

    primary_axis: dict[int, int] = {}
    for p in prompts:
        primary_axis.setdefault(p.obj_id, p.axis)
    if orientations < 6 and any(p.axis != primary_axis[p.obj_id] for p in prompts):
        raise InputError("Prompts of one object on several axes need orientations=6")
    depth = {axis: volume.shape[axis] for axis in set(primary_axis.values())}
    # Forward and reverse share their starting slice; early stop and the ROI can only make a pass shorter.
    per_axis = [n + 1 if orientations > 1 else n for n in volume.shape]
    extra_axes = [a for a in range(3) if set(primary_axis.values()) - {a}] if orientations == 6 else []
    runner.estimate(sum(per_axis[a] for a in depth) + sum(per_axis[a] for a in extra_axes))
    for axis in sorted(depth):
        objects = {o for o, a in primary_axis.items() if a == axis}
        own = [p for p in prompts if p.obj_id in objects and p.axis == axis]
        reach = {o: absent[o][axis] for o in objects if axis in absent.get(o, {})}
        runner.run_axis(
            axis, own, slices=None, both_directions=orientations > 1, user_prompts=own, reach=reach
        )
    if orientations == 6:
        first_pass = votes.result()
        apply_bounds(first_pass, absent)
        plans = []
        for axis in range(3):
            objects = {o for o, a in primary_axis.items() if a != axis}
            extra = [p for p in prompts if p.obj_id in objects and p.axis == axis]
            seeds = _seed_prompts({o: first_pass[o] for o in objects}, axis)
            if not seeds and not extra:
                continue
            plan = _ExtraAxis(axis, seeds + extra, extra, (0, volume.shape[axis]))
            if roi == "auto":
                boxes = {o: _roi_box(first_pass[o] > 0.5, spacing) for o in objects}
                found = [b for b in boxes.values() if b]
                plan.slices = _roi_slices(found, axis, [p.index for p in extra]) or plan.slices
                # The user's own prompts on this axis may reach past what the first pass found.
                corrected = {p.obj_id for p in extra}
                plan.vote_boxes = {o: b for o, b in boxes.items() if b and o not in corrected}
                plan.step = _extra_axis_step(spacing, [primary_axis[o] for o in objects], axis)
            plans.append(plan)
        if roi == "auto":
            _fit_extra_axes_to_budget(plans, budget=sum(result.frames_visited.values()))
        for plan in plans:
            runner.run_axis(
                plan.axis,
                plan.prompts,
                slices=plan.slices,
                both_directions=True,
                user_prompts=plan.user_prompts,
                vote_boxes=plan.vote_boxes,
                guides={o: first_pass[o] > 0.5 for o in plan.objects},
                step=plan.step,
            )

    probabilities = votes.result()
    runner.restore_prompted_slices(probabilities)
    apply_bounds(probabilities, absent)
    result.probabilities = probabilities
    result.labels = _labels(probabilities, obj_ids)
    runner.finish()
    result.timings["total"] = time.perf_counter() - started
    return result


@dataclass
class _ExtraAxis:
    """The run planned along a further ``axis``: its ``prompts`` (seeds, then the user's ``user_prompts`` on
    that axis), the slice range ``[start, stop)`` it covers, the objects' vote boxes and the step between the
    slices it visits."""

    axis: int
    prompts: list[Prompt]
    user_prompts: list[Prompt]
    slices: tuple[int, int]
    vote_boxes: dict[int, Box] = field(default_factory=dict)
    step: int = 1

    @property
    def objects(self) -> set[int]:
        """The objects the run tracks: those with a seed or a prompt on its axis."""
        return {p.obj_id for p in self.prompts}

    def frames(self, step: int) -> int:
        """The frames the run predicts, forward and reverse, if it visits every ``step``-th slice."""
        # Both directions predict their starting slice.
        return len(_visited_slices(*self.slices, [p.index for p in self.prompts], step)) + 1


@dataclass
class _AxisRun:
    """One run along ``axis`` over the volume slices ``visit`` (frame ``t`` is slice ``visit[t]``): ``keep``
    holds the (frame, object) pairs the user prompted, ``boxes`` the objects' vote boxes, ``reached`` the
    volume slices each object's passes reached, ``confidence`` the predicted IoUs of the tracked frames where
    each object was found, ``prompted`` each object's prompted slices (seeds included), ``both_directions``
    whether a reverse pass follows the forward one."""

    axis: int
    visit: list[int]
    keep: set[tuple[int, int]]
    boxes: dict[int, Box]
    reached: dict[int, set[int]]
    reach: dict[int, np.ndarray] = field(default_factory=dict)
    confidence: dict[int, list[float]] = field(default_factory=dict)
    prompted: dict[int, list[int]] = field(default_factory=dict)
    both_directions: bool = True

    def direction_weight(self, obj_id: int, index: int, reverse: bool) -> float:
        """How much one direction's vote for ``obj_id`` on slice ``index`` counts.

        Between two of the object's prompted slices both directions pass, each carrying the object from the
        prompt behind it, and they can disagree entirely (a correction after a wrong first prompt): as two
        equal votes they would cancel to 0.5 and leave the slice empty. So the direction coming from the
        nearer prompt counts more, linearly, and the two weights sum to 1; a slice next to a correction takes
        the correction's answer. Where one direction passes, and on a prompted slice (both give the prompt's
        answer), each counts 1."""
        slices = self.prompted.get(obj_id, [])
        below = [s for s in slices if s <= index]
        above = [s for s in slices if s >= index]
        if not self.both_directions or not below or not above:
            return 1.0
        start, end = max(below), min(above)
        if start == end:
            return 1.0
        return (index - start if reverse else end - index) / (end - start)

    def beyond_reach(self, t: int, reverse: bool) -> bool:
        """Whether no object of the run may be on a slice after frame ``t`` in the direction of travel."""
        if set(self.reached) - set(self.reach):
            return False
        ahead = slice(None, self.visit[t]) if reverse else slice(self.visit[t] + 1, None)
        return not any(allowed[ahead].any() for allowed in self.reach.values())


class _PassRunner:
    """Runs the tracking passes along one axis and adds their votes."""

    def __init__(
        self,
        model: SAM2Model,
        intensities: np.ndarray,
        memory: MemoryOptions,
        seed: int,
        votes: Votes,
        result: VolumeResult,
        progress: ProgressCallback | None,
        cancel: threading.Event | None,
        early_stop: bool,
    ) -> None:
        self.model, self.intensities, self.memory, self.seed = model, intensities, memory, seed
        self.votes, self.result, self.progress, self.cancel = votes, result, progress, cancel
        self.early_stop = early_stop
        self.done, self.total = 0, 1
        # The result on each user-prompted slice: (axis, index, obj_id) -> probability.
        self.prompted: dict[tuple[int, int, int], np.ndarray] = {}
        self.features: FeatureCache | None = None
        self.features_scope: tuple = ()

    def share_features(self, cache: FeatureCache) -> None:
        """Take slices' image features from ``cache`` when there, and leave newly encoded ones in it."""
        self.features = cache
        self.features_scope = cache.scope(self.model, self.intensities)

    def estimate(self, total: int) -> None:
        self.total = max(total, 1)

    def restore_prompted_slices(self, probabilities: dict[int, np.ndarray]) -> None:
        """A slice the user prompted keeps what its prompt gave: the other passes only cross it along one
        line each, and their votes must not overrule the prompt."""
        for (axis, index, obj_id), prob in self.prompted.items():
            probabilities[obj_id][slice_index(axis, index)] = prob

    def finish(self) -> None:
        """Report completion: early stop and the ROI usually end the run short of the estimate."""
        if self.progress is not None:
            self.progress(self.done, self.done, "done")

    def run_axis(
        self,
        axis: int,
        prompts: list[Prompt],
        slices: tuple[int, int] | None,
        both_directions: bool,
        user_prompts: list[Prompt],
        vote_boxes: dict[int, Box] | None = None,
        guides: dict[int, np.ndarray] | None = None,
        step: int = 1,
        reach: dict[int, np.ndarray] | None = None,
    ) -> None:
        """Track along ``axis``, over the slice range ``slices`` (``None``: all), every ``step``-th slice.

        ``user_prompts`` (among ``prompts``; the others are seeds from an earlier pass) mark the slices whose
        result is kept as the prompt gave it. An object with a box in ``vote_boxes`` votes background outside
        it. ``guides``: per object, a ``[Z, Y, X]`` mask from an earlier pass whose extent on each slice guides
        a box-tracking model there (:meth:`Session.add_guide`). With ``step`` > 1 the slices from the first
        prompted one on are visited ``step`` apart (and every prompted slice), and a slice between two visited
        ones gets their votes interpolated. ``reach``: per object, the slices of ``axis`` it may be on
        (``[depth]`` bool, :func:`medsam2.absent.allowed_slices`); a direction ends once every object of the
        run has passed its last one (objects not in ``reach`` may be anywhere)."""
        started = time.perf_counter()
        frames = np.moveaxis(self.intensities, axis, 0)
        first, last = slices or (0, frames.shape[0])
        visit = _visited_slices(first, last, [p.index for p in prompts], step)
        position = {index: t for t, index in enumerate(visit)}
        stack_slices = range(first, last) if step == 1 else visit
        stack = frames[first:last] if step == 1 else frames[visit]
        session = Session(
            self.model,
            stack,
            memory=self.memory,
            seed=self.seed,
            shared_features=self.features,
            frame_keys=[(*self.features_scope, axis, index) for index in stack_slices],
        )
        prompted = set()
        for p in prompts:
            index = position[p.index]
            if p.mask is not None:
                session.add_prompt(index, obj_id=p.obj_id, mask=p.mask)
            if p.points is not None or p.box is not None:
                # Clicks or a box after a mask on the same slice refine the mask's result.
                session.add_prompt(index, obj_id=p.obj_id, points=p.points, labels=p.labels, box=p.box)
            prompted.add(index)
        if self.model.config.tracking_box_margin is not None:
            for obj_id, mask in (guides or {}).items():
                for index, box in _slice_boxes(np.moveaxis(mask, axis, 0)[visit]).items():
                    session.add_guide(index, obj_id, box)
        name = ("axial", "coronal", "sagittal")[axis]
        run = _AxisRun(
            axis=axis,
            visit=visit,
            keep={(position[p.index], p.obj_id) for p in user_prompts},
            boxes=vote_boxes or {},
            reached={p.obj_id: set() for p in prompts},
            reach=reach or {},
            prompted={
                o: sorted({p.index for p in prompts if p.obj_id == o}) for o in {p.obj_id for p in prompts}
            },
            both_directions=both_directions,
        )
        self._direction(session, run, min(prompted), max(prompted), False, f"{name} forward")
        if both_directions:
            self._direction(session, run, max(prompted), min(prompted), True, f"{name} reverse")
        for obj_id, indices in run.reached.items():
            self.votes.add_background(axis, obj_id, set(range(frames.shape[0])) - indices)
        self.votes.end_run(self._run_weights(run))
        self.result.frames_encoded += session.frames_encoded
        self.result.timings[f"{name}"] = self.result.timings.get(name, 0.0) + time.perf_counter() - started

    def _direction(
        self, session: Session, run: _AxisRun, start: int, last_prompt: int, reverse: bool, name: str
    ) -> None:
        absent_run, visited = 0, 0
        previous: dict[int, tuple[int, np.ndarray]] = {}  # per object, the last slice voted on and its vote
        # An object whose own prompt lies further on has no box to track and no memory yet: a guess there
        # would vote, and would enter its memory.
        for t, logits in session.propagate(start=start, reverse=reverse, from_own_prompts=True):
            self._check_cancel()
            voted = self._vote(run, t, {obj_id: _sigmoid(x) for obj_id, x in logits.items()}, reverse)
            for obj_id, prob in voted.items():
                record = session.tracks[obj_id].tracked.get(t)  # None on a prompted frame
                if record is not None and (logits[obj_id] > 0).any():
                    run.confidence.setdefault(obj_id, []).append(record.iou)
                if obj_id in previous:
                    self._vote_between(run, obj_id, previous[obj_id], (run.visit[t], prob), reverse)
                previous[obj_id] = (run.visit[t], prob)
            visited += 1
            self.done += 1
            if self.progress is not None:
                self.total = max(self.total, self.done)
                self.progress(self.done, self.total, name)
            past_prompts = t < last_prompt if reverse else t > last_prompt
            absent_run = absent_run + 1 if all((x <= 0).all() for x in logits.values()) else 0
            if self.early_stop and past_prompts and absent_run >= _ABSENT_FRAMES_TO_STOP:
                break
            if past_prompts and run.beyond_reach(t, reverse):
                break
        # An axis can run twice (for objects prompted on it, then as an extra axis for the others).
        self.result.frames_visited[name] = self.result.frames_visited.get(name, 0) + visited

    def _vote(
        self, run: _AxisRun, t: int, probabilities: dict[int, np.ndarray], reverse: bool
    ) -> dict[int, np.ndarray]:
        """Add frame ``t``'s probabilities as votes (outside an object's vote box: background; weighted by
        :meth:`_AxisRun.direction_weight`); returns them."""
        index = run.visit[t]
        for obj_id, prob in probabilities.items():
            box = run.boxes.get(obj_id)
            if box is not None:
                probabilities[obj_id] = _inside_box(prob, box, run.axis, index)
            run.reached[obj_id].add(index)
            if (t, obj_id) in run.keep:
                self.prompted[(run.axis, index, obj_id)] = probabilities[obj_id]
        weights = {obj_id: run.direction_weight(obj_id, index, reverse) for obj_id in probabilities}
        self.votes.add(run.axis, index, probabilities, weights)
        return probabilities

    def _run_weights(self, run: _AxisRun) -> dict[int, float]:
        """Each object's weight for the run's votes: its mean predicted IoU on the tracked frames where it was
        found, with confidence aggregation (none found: the seeds and prompts alone, weight 1); else 1."""
        if self.votes.aggregate is not Aggregation.CONFIDENCE:
            return {}
        return {obj_id: float(np.mean(ious)) for obj_id, ious in run.confidence.items()}

    def _vote_between(
        self,
        run: _AxisRun,
        obj_id: int,
        before: tuple[int, np.ndarray],
        after: tuple[int, np.ndarray],
        reverse: bool,
    ) -> None:
        """Votes on the slices that lie between two slices visited one after the other (``step`` > 1),
        interpolated linearly between the two slices' votes."""
        (a, vote_a), (b, vote_b) = before, after
        for index in range(min(a, b) + 1, max(a, b)):
            weight = (index - a) / (b - a)
            vote = {obj_id: (1 - weight) * vote_a + weight * vote_b}
            self.votes.add(run.axis, index, vote, {obj_id: run.direction_weight(obj_id, index, reverse)})
            run.reached[obj_id].add(index)

    def _check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("Segmentation was cancelled; nothing was returned")


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))).astype(np.float32)


def _seed_prompts(first_pass: dict[int, np.ndarray], axis: int) -> list[Prompt]:
    """For each object, a mask prompt on the ``axis`` slice where the first pass found it largest."""
    seeds = []
    for obj_id, prob in first_pass.items():
        mask = prob > 0.5
        if not mask.any():
            continue
        other = tuple(a for a in range(3) if a != axis)
        index = int(np.argmax(mask.sum(axis=other)))
        seeds.append(Prompt(axis=axis, index=index, obj_id=obj_id, mask=np.take(mask, index, axis=axis)))
    return seeds


def _extra_axis_step(spacing: Sequence[float] | None, prompt_axes: list[int], axis: int) -> int:
    """How many slices apart a further axis is visited: as far apart (in mm) as the slices of the objects'
    prompt axis, so that every view samples them about as finely as the first pass did (10 mm axial slices
    and 3 mm pixels: every third coronal slice); 1 without ``spacing``."""
    if spacing is None:
        return 1
    return max(1, round(min(spacing[a] for a in prompt_axes) / spacing[axis]))


def _fit_extra_axes_to_budget(plans: list[_ExtraAxis], budget: int) -> None:
    """Widen the steps of the further axes' runs, all alike, until together they predict at most ``budget``
    frames (the first pass's): four more orientations for the cost of the first two, instead of about three
    times it on an isotropic volume, where an extra axis's ROI is as deep as the object is wide. A run still
    visits at least ``_MIN_EXTRA_AXIS_SLICES`` slices of its range, so a thin object is not skipped over.
    Measured on the held-out volumes (BENCHMARKS.md section 4): 0.006 of mean Dice for 3-5x less time."""
    limits = [max(plan.step, (plan.slices[1] - plan.slices[0]) // _MIN_EXTRA_AXIS_SLICES) for plan in plans]
    for step in range(1, max(limits, default=1) + 1):
        steps = [max(plan.step, min(step, limit)) for plan, limit in zip(plans, limits)]
        if sum(plan.frames(s) for plan, s in zip(plans, steps)) <= budget:
            break
    for plan, step in zip(plans, steps):
        plan.step = step


def _visited_slices(first: int, last: int, prompted: list[int], step: int) -> list[int]:
    """The slices of ``[first, last)`` that are ``step`` apart counting from the first prompted one, and the
    prompted slices."""
    origin = min(prompted)
    grid = range(origin - (origin - first) // step * step, last, step)
    return sorted(set(grid) | set(prompted))


def _slice_boxes(mask: np.ndarray) -> dict[int, tuple[int, int, int, int]]:
    """The box ``(x0, y0, x1, y1)`` (pixel edges) of ``mask`` ``[T, H, W]`` on each slice where it is set."""
    boxes = {}
    for t in np.flatnonzero(mask.any(axis=(1, 2))):
        rows = np.flatnonzero(mask[t].any(axis=1))
        cols = np.flatnonzero(mask[t].any(axis=0))
        boxes[int(t)] = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    return boxes


def _roi_box(found: np.ndarray, spacing: Sequence[float] | None) -> Box | None:
    """The bounding box of the voxels where ``found`` ``[Z, Y, X]``, grown on each axis by a margin (a
    fraction of the extent, some voxels, and at least 5 mm when ``spacing`` is known); ``None`` if empty."""
    if not found.any():
        return None
    box = []
    for axis in range(3):
        hits = np.flatnonzero(found.any(axis=tuple(b for b in range(3) if b != axis)))
        lo, hi = int(hits[0]), int(hits[-1]) + 1
        margin = max(int(np.ceil(_ROI_MARGIN_FRACTION * (hi - lo))), _ROI_MARGIN_VOXELS)
        if spacing is not None:
            margin = max(margin, int(np.ceil(5.0 / float(spacing[axis]))))
        box.append(slice(max(lo - margin, 0), min(hi + margin, found.shape[axis])))
    return tuple(box)


def _roi_slices(boxes: list[Box], axis: int, prompt_slices: list[int]) -> tuple[int, int] | None:
    """The range of ``axis`` slices that the objects' boxes span, taking in the slices the user prompted on
    this axis; ``None`` (every slice) when there is no box."""
    if not boxes:
        return None
    lo, hi = min(b[axis].start for b in boxes), max(b[axis].stop for b in boxes)
    if prompt_slices:
        lo, hi = min(lo, *prompt_slices), max(hi, max(prompt_slices) + 1)
    return lo, hi


def _inside_box(probability: np.ndarray, box: Box, axis: int, index: int) -> np.ndarray:
    """``probability`` on slice ``index`` of ``axis``, set to 0 outside ``box``."""
    inside = np.zeros_like(probability)
    if box[axis].start <= index < box[axis].stop:
        rows, cols = (box[a] for a in range(3) if a != axis)
        inside[rows, cols] = probability[rows, cols]
    return inside


def _labels(probabilities: dict[int, np.ndarray], obj_ids: list[int]) -> np.ndarray:
    """Each voxel gets the most probable object whose probability exceeds 0.5 (0 where none does)."""
    dtype = np.uint8 if max(obj_ids) < 256 else np.uint16
    stacked = np.stack([probabilities[i] for i in obj_ids])
    best = stacked.argmax(axis=0)
    labels = np.asarray(obj_ids, dtype=dtype)[best]
    labels[stacked.max(axis=0) <= 0.5] = 0
    return labels


def _checked_volume(volume: np.ndarray) -> np.ndarray:
    if isinstance(volume, torch.Tensor):
        volume = volume.detach().cpu().numpy()
    volume = np.asarray(volume)
    if volume.ndim == 2:
        raise InputError(
            f"Got a 2D image of shape {volume.shape}, not a volume: use medsam2.segment_images for 2D images"
        )
    if volume.ndim != 3:
        raise InputError(
            f"Expected a scalar [Z, Y, X] volume, got shape {volume.shape} (4D and vector images are not supported)"
        )
    if min(volume.shape) < 2:
        raise InputError(f"The volume {volume.shape} needs at least 2 voxels along every axis")
    return volume


def _checked_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    values = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if values.shape != (3,) or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise InputError(f"spacing must be three positive numbers (z, y, x in mm), got {spacing!r}")
    return tuple(float(v) for v in values)


def _checked_prompts(prompts: Sequence[Prompt], shape: tuple[int, ...]) -> list[Prompt]:
    prompts = list(prompts)
    if not prompts:
        raise InputError("segment_volume needs at least one prompt")
    for p in prompts:
        if not isinstance(p, Prompt):
            raise InputError(f"Prompts must be medsam2.Prompt objects, got {type(p).__name__}")
        if int(p.obj_id) > np.iinfo(np.uint16).max:  # labels are stored as uint16 at most
            raise InputError(f"Prompt obj_id must be at most 65535, got {p.obj_id}")
        p.check_fits(shape)
    check_absent(prompts)
    return prompts
