"""Which past frames a frame attends to: SAM 2's recent-frames rule and MedSAM-2's self-sorting bank.

A policy reads an object's :class:`ObjectTrack` and returns the :class:`~medsam2.model.sam2.MemoryContext`
for the frame being predicted; after the frame is predicted it may update its own state (the bank).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.nn.functional as F

from .configs import ModelConfig
from .errors import InputError
from .model.presence import Region
from .model.sam2 import Memory, MemoryContext


class MemoryPolicy(str, Enum):
    RECENT = "recent"
    SELF_SORTING = "self-sorting"


@dataclass(frozen=True)
class MemoryOptions:
    """How memory is chosen.

    ``policy``: ``"recent"`` is SAM 2's rule (all prompted frames and the ``num_maskmem - 1`` nearest
    previous frames); ``"self-sorting"`` is MedSAM-2's bank. For the bank: ``capacity`` entries (default
    ``num_maskmem - 1``); a predicted frame is a candidate when its predicted IoU is at least
    ``confidence_threshold`` and the object is present; ``sort_by_dissimilarity`` keeps the most mutually
    dissimilar entries (off: the most recent confident ones); ``resample`` draws the attended entries with
    replacement, weighted by similarity to the current frame (off: all entries). ``descriptor_grid`` is the
    side of the pooled feature grid that similarities are computed on. ``storage_dtype`` (``"bfloat16"``
    halves memory on a GPU) is the dtype memory features are kept in.
    """

    policy: str = MemoryPolicy.SELF_SORTING.value
    capacity: int | None = None
    confidence_threshold: float = 0.5
    sort_by_dissimilarity: bool = True
    resample: bool = True
    descriptor_grid: int = 4
    storage_dtype: str = "float32"

    def __post_init__(self) -> None:
        try:
            MemoryPolicy(self.policy)
        except ValueError:
            known = ", ".join(p.value for p in MemoryPolicy)
            raise InputError(f"Unknown memory policy {self.policy!r}; choose one of: {known}") from None
        if self.capacity is not None and self.capacity < 1:
            raise InputError(f"Memory capacity must be at least 1, got {self.capacity}")
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise InputError(f"confidence_threshold must lie in [0, 1], got {self.confidence_threshold}")
        if self.storage_dtype not in ("float32", "bfloat16", "float16"):
            raise InputError(
                f"storage_dtype must be float32, bfloat16 or float16, got {self.storage_dtype!r}"
            )

    @property
    def torch_storage_dtype(self) -> torch.dtype:
        return getattr(torch, self.storage_dtype)


@dataclass
class FrameRecord:
    """One object's result on one frame.

    ``low_res_logits``: ``[1, 1, 4h, 4w]``; ``obj_ptr``: ``[1, C]``; ``object_score``: logit of presence;
    ``iou``: predicted IoU of the chosen mask (the confidence); ``descriptor``: unit vector describing the
    frame's image, for the self-sorting bank; ``region``: what the predicted mask covers (models with a
    presence head).
    """

    frame: int
    low_res_logits: torch.Tensor
    obj_ptr: torch.Tensor
    object_score: float
    iou: float
    memory: Memory | None = None
    descriptor: torch.Tensor | None = None
    region: Region | None = None

    @property
    def present(self) -> bool:
        return self.object_score > 0


@dataclass
class ObjectTrack:
    """Everything the session knows about one object.

    ``conditioning``: prompted frames with encoded memory; ``pending``: frames prompted since the last
    propagation (memory encoded when propagation starts); ``tracked``: propagated frames; ``reverse``: the
    direction each frame was last tracked in; ``guides``: boxes ``[1, 2, 2]`` (model input pixels) that a
    box-tracking model tracks those frames with instead of its neighbour's box; ``bank``: the self-sorting
    bank of the current pass; ``generator``: the bank's random draws. Each object has its own, so that
    adding an object leaves the others' results as they were.
    """

    obj_id: int
    prompts: dict[int, dict] = field(default_factory=dict)
    conditioning: dict[int, FrameRecord] = field(default_factory=dict)
    pending: dict[int, FrameRecord] = field(default_factory=dict)
    tracked: dict[int, FrameRecord] = field(default_factory=dict)
    reverse: dict[int, bool] = field(default_factory=dict)
    guides: dict[int, torch.Tensor] = field(default_factory=dict)
    bank: list[FrameRecord] = field(default_factory=list)
    generator: torch.Generator = field(default_factory=torch.Generator)

    def latest(self, frame: int) -> FrameRecord | None:
        """The newest record of ``frame``: a pending prompt result first, then stored results."""
        for records in (self.pending, self.conditioning, self.tracked):
            if frame in records:
                return records[frame]
        return None


def frame_descriptor(embedding: torch.Tensor, grid: int) -> torch.Tensor:
    """A frame's image embedding ``[1, C, h, w]`` pooled to ``grid x grid`` -> unit vector ``[C * grid^2]``."""
    pooled = F.adaptive_avg_pool2d(embedding.float(), grid).flatten()
    return F.normalize(pooled, dim=0)


class RecentFrames:
    """SAM 2's rule: every prompted frame, plus the ``num_maskmem - 1`` frames just before this one."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config

    def start_pass(self, track: ObjectTrack) -> None:
        """Called when a propagation pass begins."""

    def context(
        self, track: ObjectTrack, frame: int, reverse: bool, num_frames: int, descriptor: torch.Tensor | None
    ) -> MemoryContext:
        step = 1 if reverse else -1  # towards the frames already tracked
        prompted_slot = self.config.num_maskmem - 1
        frames = [(rec.memory, prompted_slot) for rec in track.conditioning.values()]
        for distance in range(self.config.num_maskmem - 1, 0, -1):
            rec = track.tracked.get(frame + step * distance)
            if rec is not None and rec.memory is not None:  # a lost object's frame has no memory
                frames.append((rec.memory, distance - 1))
        pointers = _conditioning_pointers(self.config, track, frame, reverse)
        pointer_range = min(num_frames, self.config.max_obj_ptrs_in_encoder) - 1
        for distance in range(1, pointer_range + 1):
            other = frame + step * distance
            if not 0 <= other < num_frames:
                break
            rec = track.tracked.get(other)
            if rec is not None:
                pointers.append((distance, rec.obj_ptr))
        return MemoryContext(frames, pointers, pointer_range, _prompted_regions(track))

    def observe(self, track: ObjectTrack, record: FrameRecord) -> None:
        """Called after a frame is tracked; the recent rule keeps no state of its own."""

    def attends(self, track: ObjectTrack, record: FrameRecord) -> bool:
        """Whether a later frame may attend to ``record`` (after :meth:`observe`): only then is its memory
        encoded. Under the recent rule, the next frames attend to every tracked frame."""
        return True


class SelfSortingBank(RecentFrames):
    """MedSAM-2's self-sorting memory bank (paper Eqs. 2-5).

    Prompted frames are always attended. Confident predictions enter the bank; the bank keeps the
    ``capacity`` entries with the largest total dissimilarity to the others, and before each frame the
    attended entries are drawn with replacement with probability proportional to their (clamped) cosine
    similarity to the current frame.
    """

    def __init__(self, config: ModelConfig, options: MemoryOptions) -> None:
        super().__init__(config)
        self.options = options
        self.capacity = options.capacity or config.num_maskmem - 1

    def start_pass(self, track: ObjectTrack) -> None:
        track.bank = []

    def context(
        self, track: ObjectTrack, frame: int, reverse: bool, num_frames: int, descriptor: torch.Tensor | None
    ) -> MemoryContext:
        sign = -1 if reverse else 1
        prompted_slot = self.config.num_maskmem - 1
        pointer_range = min(num_frames, self.config.max_obj_ptrs_in_encoder) - 1
        frames = [(rec.memory, prompted_slot) for rec in track.conditioning.values()]
        pointers = _conditioning_pointers(self.config, track, frame, reverse)
        for rec in self.draw(track.bank, descriptor, track.generator):
            distance = abs(frame - rec.frame)
            frames.append((rec.memory, min(max(distance, 1), prompted_slot) - 1))
            pointers.append(
                (max(-pointer_range, min(pointer_range, (frame - rec.frame) * sign)), rec.obj_ptr)
            )
        return MemoryContext(frames, pointers, pointer_range, _prompted_regions(track))

    def draw(
        self, bank: list[FrameRecord], descriptor: torch.Tensor | None, generator: torch.Generator
    ) -> list[FrameRecord]:
        """The entries attended for the current frame (Eqs. 4-5)."""
        if not bank or not self.options.resample or descriptor is None:
            return list(bank)
        weights = self.sampling_weights(bank, descriptor)
        picks = torch.multinomial(weights, self.capacity, replacement=True, generator=generator)
        return [bank[i] for i in picks.tolist()]

    @staticmethod
    def sampling_weights(bank: list[FrameRecord], descriptor: torch.Tensor) -> torch.Tensor:
        """Cosine similarities of the entries to the current frame, negatives clamped to 0; uniform if all 0."""
        entries = torch.stack([rec.descriptor for rec in bank]).to(descriptor.device)
        weights = (entries @ descriptor).clamp(min=0).cpu().double()
        if weights.sum() <= 0:
            return torch.ones(len(bank), dtype=torch.float64)
        return weights

    def attends(self, track: ObjectTrack, record: FrameRecord) -> bool:
        """Only the bank's entries are attended (besides the prompted frames)."""
        return any(entry is record for entry in track.bank)

    def observe(self, track: ObjectTrack, record: FrameRecord) -> None:
        """Eqs. 2-3: a confident, present prediction joins; the bank keeps the most dissimilar entries."""
        if not record.present or record.iou < self.options.confidence_threshold:
            return
        candidates = [*track.bank, record]
        if len(candidates) <= self.capacity:
            track.bank = candidates
        elif self.options.sort_by_dissimilarity:
            keep = most_dissimilar(torch.stack([rec.descriptor for rec in candidates]), self.capacity)
            track.bank = [candidates[i] for i in keep]
        else:
            track.bank = candidates[-self.capacity :]


def most_dissimilar(descriptors: torch.Tensor, k: int) -> list[int]:
    """Indices (in input order) of the ``k`` rows with the largest ``D_i = sum_j (1 - sim(E_i, E_j))``.

    ``descriptors``: ``[N, D]`` unit vectors. Ties keep the earlier entry.
    """
    sim = descriptors.float() @ descriptors.float().T
    dissimilarity = (1 - sim).sum(dim=1) - (1 - sim.diagonal())
    order = sorted(range(len(dissimilarity)), key=lambda i: (-float(dissimilarity[i]), i))
    return sorted(order[:k])


def _conditioning_pointers(
    config: ModelConfig, track: ObjectTrack, frame: int, reverse: bool
) -> list[tuple[int, torch.Tensor]]:
    """Object pointers of the prompted frames at or before ``frame`` in the tracking direction."""
    sign = -1 if reverse else 1
    pointers = []
    for t, rec in track.conditioning.items():
        if (t >= frame) if reverse else (t <= frame):
            # SAM 2.1 encodes a signed distance; 2.0 does not encode it at all, so the sign is moot there.
            distance = (frame - t) * sign if config.proj_tpos_enc_in_obj_ptrs else abs(frame - t)
            pointers.append((distance, rec.obj_ptr))
    return pointers


def _prompted_regions(track: ObjectTrack) -> list[Region]:
    return [rec.region for rec in track.conditioning.values() if rec.region is not None]


def make_policy(config: ModelConfig, options: MemoryOptions) -> RecentFrames | SelfSortingBank:
    if MemoryPolicy(options.policy) is MemoryPolicy.RECENT:
        return RecentFrames(config)
    return SelfSortingBank(config, options)


def object_generator(seed: int, obj_id: int) -> torch.Generator:
    """The generator of one object's random draws, fixed by the session's ``seed`` and the object's id."""
    return torch.Generator().manual_seed(hash((seed, obj_id)) % 2**63)
