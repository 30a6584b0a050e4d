"""Video-style segmentation of a frame sequence: prompts on some frames, propagation through the rest."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence

import numpy as np
import torch
from scipy import ndimage

from .errors import InputError
from .feature_cache import FeatureCache
from .frames import FrameStack
from .memory import FrameRecord, MemoryOptions, ObjectTrack, frame_descriptor, make_policy, object_generator
from .model.sam2 import ImageFeatures, MaskPrediction, Memory, SAM2Model

# Previous logits fed back with new clicks are clipped so that a confident old answer can still be changed.
_PREVIOUS_LOGIT_CLIP = 32.0
_DEFAULT_FEATURE_CACHE_BYTES = 1 << 30


class Session:
    """Segments objects through a sequence of frames with a SAM 2 model.

    ``frames``: ``[T, H, W]`` (float in [0, 1]) or ``[T, H, W, 3]`` (uint8 or float in [0, 1]); prompts and
    outputs use the frames' pixel coordinates (x = column, y = row). Outputs are mask logits ``[H, W]``
    (mask = logits > 0); an object predicted absent gets -1024 everywhere.

    A prompt on a frame that was already tracked is a correction: that frame becomes a prompted
    (conditioning) frame, and the next :meth:`propagate` recomputes every frame that is not prompted.

    ``consecutive``: the frames are neighbouring slices or video frames, so a model with a
    ``tracking_box_margin`` prompts each tracked frame with the box of its neighbour's mask; ``False`` for
    unrelated images, which then get the box of the nearest prompted frame's mask (the template's).

    ``shared_features`` with ``frame_keys`` (one hashable key per frame, see
    :class:`~medsam2.feature_cache.FeatureCache`) reuses image features encoded by earlier sessions over the
    same frames and leaves this session's there for later ones.

    ``frames`` may also be a ready :class:`FrameStack` (e.g. one that prepares frames another way).
    ``fill_hole_area``: as SAM 2's video predictor option, background regions of at most this many pixels of
    the low-resolution mask are filled in every output (after the tracked frame's memory was encoded).
    """

    def __init__(
        self,
        model: SAM2Model,
        frames: np.ndarray | torch.Tensor | FrameStack,
        memory: MemoryOptions | None = None,
        seed: int = 0,
        feature_cache_bytes: int = _DEFAULT_FEATURE_CACHE_BYTES,
        consecutive: bool = True,
        shared_features: FeatureCache | None = None,
        frame_keys: Sequence[Hashable] | None = None,
        fill_hole_area: int = 0,
    ) -> None:
        self.model = model
        self.consecutive = consecutive
        self.fill_hole_area = fill_hole_area
        self.frames = frames if isinstance(frames, FrameStack) else FrameStack(frames, model.config)
        self.options = memory or MemoryOptions()
        self.seed = seed
        self.policy = make_policy(model.config, self.options)
        self.tracks: dict[int, ObjectTrack] = {}
        self._features: OrderedDict[int, ImageFeatures] = OrderedDict()
        self._descriptors: dict[int, torch.Tensor] = {}
        self._feature_cache_bytes = feature_cache_bytes
        if shared_features is not None and (frame_keys is None or len(frame_keys) != len(self.frames)):
            raise InputError("shared_features needs one key per frame in frame_keys")
        self._shared = shared_features
        self._frame_keys = list(frame_keys) if shared_features is not None else None
        self.frames_encoded = 0

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    @property
    def obj_ids(self) -> list[int]:
        return list(self.tracks)

    # ------------------------------------------------------------------ prompts

    @torch.inference_mode()
    def add_prompt(
        self,
        frame: int,
        obj_id: int = 1,
        points: Sequence[Sequence[float]] | None = None,
        labels: Sequence[int] | None = None,
        box: Sequence[float] | None = None,
        mask: np.ndarray | None = None,
    ) -> np.ndarray:
        """Prompt object ``obj_id`` on ``frame``; returns its logits ``[H, W]`` on that frame.

        Clicks and a box may be combined; a mask is used on its own. A new prompt replaces the earlier prompt
        of the same object on the same frame, and new clicks refine the frame's previous prediction.
        """
        self._check_frame(frame)
        points_in = self._point_inputs(points, labels, box)
        if mask is not None and points_in is not None:
            raise InputError("Give either a mask or clicks/a box for one prompt, not both")
        if mask is None and points_in is None:
            raise InputError("A prompt needs points, a box or a mask")
        mask_in = None if mask is None else self._mask_input(mask)
        track = self.tracks.get(int(obj_id)) or ObjectTrack(
            int(obj_id), generator=object_generator(self.seed, int(obj_id))
        )
        with self._precision():
            prediction = self._predict_prompt(track, frame, points_in, mask_in)
        track.prompts[frame] = {"points": points_in} if mask_in is None else {"mask": mask_in}
        track.pending[frame] = self._record(frame, prediction)
        self.tracks[track.obj_id] = track
        return self.frames.logits_to_frame(prediction.low_res_logits)[0].cpu().numpy()

    def _predict_prompt(
        self,
        track: ObjectTrack,
        frame: int,
        points_in: tuple[torch.Tensor, torch.Tensor] | None,
        mask_in: torch.Tensor | None,
    ) -> MaskPrediction:
        features = self._frame_features(frame)
        if mask_in is not None:
            # A mask prompt is the frame's answer as it is: no memory is read.
            return self.model.predict(features, None, mask=mask_in)
        first_time = frame not in track.reverse
        reverse = track.reverse.get(frame, False)
        context = (
            None
            if first_time
            else self.policy.context(track, frame, reverse, self.num_frames, self._descriptors.get(frame))
        )
        previous = track.latest(frame)
        previous_logits = None
        if previous is not None:
            previous_logits = previous.low_res_logits.to(self.model.device).clamp(
                -_PREVIOUS_LOGIT_CLIP, _PREVIOUS_LOGIT_CLIP
            )
        return self.model.predict(
            features, context, points=points_in, previous_logits=previous_logits, user_prompt=True
        )

    def add_guide(self, frame: int, obj_id: int, box: Sequence[float]) -> None:
        """Track ``obj_id`` on ``frame`` with ``box`` ``(x0, y0, x1, y1)`` (frame pixels), e.g. the extent of
        the object found there by an earlier pass over the same data, instead of the box of its neighbour's
        mask. Only a model that tracks with boxes (``config.tracking_box_margin``) uses it; the object is
        then not lost on that frame. A prompted frame keeps its prompt."""
        self._check_frame(frame)
        track = self.tracks.get(int(obj_id))
        if track is None:
            raise InputError(f"Object {obj_id} has no prompt to guide")
        points, _ = self._point_inputs(None, None, box)
        track.guides[int(frame)] = points

    def _point_inputs(
        self,
        points: Sequence[Sequence[float]] | None,
        labels: Sequence[int] | None,
        box: Sequence[float] | None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Clicks and box as model-space coordinates ``[1, N, 2]`` and labels ``[1, N]`` (box corners first)."""
        coords, kinds = [], []
        if box is not None:
            b = np.asarray(box, dtype=np.float64).reshape(-1)
            if b.shape != (4,) or not np.all(np.isfinite(b)) or b[2] <= b[0] or b[3] <= b[1]:
                raise InputError(f"A box must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {box!r}")
            # A box may reach past the frame (drawn to the edge); it must overlap the frame, and is clipped to it.
            w, h = self.frames.width, self.frames.height
            if b[2] < 0 or b[3] < 0 or b[0] > w or b[1] > h:
                raise InputError(f"The box {tuple(b)} lies outside the {w}x{h} frame")
            b = np.clip(b, 0, [w, h, w, h])
            coords += b.reshape(2, 2).tolist()
            kinds += [2, 3]
        if points is not None:
            p = np.asarray(points, dtype=np.float64)
            if p.ndim != 2 or p.shape[1] != 2 or not len(p) or not np.all(np.isfinite(p)):
                raise InputError(f"Points must be a list of (x, y) pairs, got {points!r}")
            lab = [1] * len(p) if labels is None else [int(v) for v in labels]
            if len(lab) != len(p) or any(v not in (0, 1) for v in lab):
                raise InputError("Labels must give 1 (positive) or 0 (negative) for each point")
            self._check_inside(p, "point")
            coords += p.tolist()
            kinds += lab
        elif labels is not None:
            raise InputError("Labels were given without points")
        if not coords:
            return None
        device = self.model.device
        xy = torch.tensor(self.frames.to_model_coords(np.asarray(coords)), dtype=torch.float32, device=device)
        return xy[None], torch.tensor(kinds, dtype=torch.int32, device=device)[None]

    def _check_inside(self, xy: np.ndarray, what: str) -> None:
        w, h = self.frames.width, self.frames.height
        for x, y in xy:
            if not (0 <= x <= w and 0 <= y <= h):
                raise InputError(f"The {what} ({x:g}, {y:g}) lies outside the {w}x{h} frame")

    def _mask_input(self, mask: np.ndarray) -> torch.Tensor:
        mask = np.asarray(mask)
        if mask.shape != (self.frames.height, self.frames.width):
            raise InputError(
                f"The mask prompt has shape {mask.shape}; the frames are {self.frames.height}x{self.frames.width}"
            )
        if not mask.any():
            raise InputError("The mask prompt is empty")
        return self.frames.mask_to_model(mask.astype(bool), self.model.device)

    # ------------------------------------------------------------------ propagation

    @torch.inference_mode()
    def propagate(
        self,
        start: int | None = None,
        reverse: bool = False,
        max_frames: int | None = None,
        from_own_prompts: bool = False,
    ) -> Iterator[tuple[int, dict[int, np.ndarray]]]:
        """Track every object from ``start`` (default: the first prompted frame) in one direction.

        Yields ``(frame, {obj_id: logits [H, W]})`` for each frame, ``max_frames`` frames after ``start`` at
        most. Prompted frames give their prompted result. By default every object is tracked on every frame,
        as SAM 2's video predictor does, also before that object's own first prompt in this direction;
        ``from_own_prompts`` leaves an object out of the frames before it (its dict has no entry there).
        """
        for t, predictions in self.propagate_low_res(start, reverse, max_frames, from_own_prompts):
            yield (
                t,
                {
                    obj_id: self.frames.logits_to_frame(lr)[0].cpu().numpy()
                    for obj_id, lr in predictions.items()
                },
            )

    @torch.inference_mode()
    def propagate_low_res(
        self,
        start: int | None = None,
        reverse: bool = False,
        max_frames: int | None = None,
        from_own_prompts: bool = False,
    ) -> Iterator[tuple[int, dict[int, torch.Tensor]]]:
        """Like :meth:`propagate`, but yields the model's low-resolution logits ``[1, 1, 4h, 4w]``."""
        self._commit_prompts()
        if start is None:
            start = min(t for track in self.tracks.values() for t in track.conditioning)
        self._check_frame(start)
        span = self.num_frames if max_frames is None else max_frames
        order = (
            range(start, max(start - span, 0) - 1, -1)
            if reverse
            else range(start, min(start + span, self.num_frames - 1) + 1)
        )
        for track in self.tracks.values():
            self.policy.start_pass(track)
        for t in order:
            out = {}
            for track in self.tracks.values():
                if from_own_prompts and _before_own_prompts(track, t, reverse):
                    continue
                record = track.conditioning.get(t)
                if record is None:
                    with self._precision():
                        record = self._track_frame(track, t, reverse)
                track.reverse[t] = reverse
                out[track.obj_id] = record.low_res_logits
            yield t, out

    def _track_frame(self, track: ObjectTrack, t: int, reverse: bool) -> FrameRecord:
        neighbour = self._tracking_neighbour(track, t, reverse)
        previous = None if neighbour is None else neighbour.low_res_logits
        guide = track.guides.get(t)
        lost = self.model.lost_objects(previous)
        if guide is None and lost is not None and bool(lost.all()):
            # A lost object needs neither the frame's features nor a memory: it stays absent.
            record = self._record(t, self.model.lost_prediction(1))
            track.tracked[t] = record
            return record
        features = self._frame_features(t)
        context = self.policy.context(track, t, reverse, self.num_frames, self._descriptors.get(t))
        region = None if neighbour is None else neighbour.region
        prediction = self.model.track(features, context, previous, guide=guide, previous_region=region)
        record = self._record(t, prediction)
        track.tracked[t] = record
        self.policy.observe(track, record)
        if self.policy.attends(track, record):
            record.memory = self._memory(
                features, prediction.high_res_logits, prediction.object_score, binarize=False
            )
        return record

    def _tracking_neighbour(self, track: ObjectTrack, t: int, reverse: bool) -> FrameRecord | None:
        """For models that track with a box, the result its box comes from: the neighbour just processed, or
        for unrelated images the nearest prompted frame."""
        if self.model.config.tracking_box_margin is None:
            return None
        if self.consecutive:
            neighbour = t + 1 if reverse else t - 1
            record = track.conditioning.get(neighbour) or track.tracked.get(neighbour)
        else:
            nearest = min(track.conditioning, key=lambda c: abs(c - t), default=None)
            record = None if nearest is None else track.conditioning[nearest]
        return record

    def _commit_prompts(self) -> None:
        """Encode the memory of frames prompted since the last propagation and make them conditioning frames."""
        if not self.tracks:
            raise InputError("Add a prompt before propagating")
        with self._precision():
            self._encode_prompted_memory()

    def _encode_prompted_memory(self) -> None:
        for track in self.tracks.values():
            for t, record in track.pending.items():
                features = self._frame_features(t)
                high_res = self.model.upsample_logits(record.low_res_logits.to(self.model.device))
                score = torch.tensor([[record.object_score]], device=self.model.device)
                # Masks from prompts are binarised for memory, as SAM 2 does for its prompted frames.
                record.memory = self._memory(features, high_res, score, binarize=True)
                track.conditioning[t] = record
                track.tracked.pop(t, None)
            track.pending.clear()

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        """Forget all objects, prompts and results (cached image features are kept)."""
        self.tracks.clear()

    def _precision(self) -> contextlib.AbstractContextManager:
        """Autocast around model calls when the model was loaded for reduced precision (CUDA only)."""
        dtype = self.model.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.model.device.type, dtype=dtype)

    def _check_frame(self, frame: int) -> None:
        if not 0 <= int(frame) < self.num_frames:
            raise InputError(f"Frame {frame} is outside the sequence of {self.num_frames} frames")

    def _frame_features(self, t: int) -> ImageFeatures:
        features = self._features.get(t)
        if features is not None:
            self._features.move_to_end(t)
            return features
        features = self._shared.get(self._frame_keys[t]) if self._shared is not None else None
        if features is None:
            image = self.frames.model_input(t, self.model.device, self.model.dtype)
            features = self.model.encode_image(image)
            self.frames_encoded += 1
            if self._shared is not None:
                self._shared.put(self._frame_keys[t], features)
        self._descriptors[t] = frame_descriptor(features.embedding, self.options.descriptor_grid)
        self._features[t] = features
        while (
            len(self._features) > 1
            and sum(f.nbytes for f in self._features.values()) > self._feature_cache_bytes
        ):
            self._features.popitem(last=False)
        return features

    def _record(self, t: int, prediction: MaskPrediction) -> FrameRecord:
        logits = prediction.low_res_logits
        return FrameRecord(
            frame=t,
            low_res_logits=fill_holes(logits, self.fill_hole_area) if self.fill_hole_area else logits,
            obj_ptr=prediction.obj_ptr,
            object_score=float(prediction.object_score.reshape(-1)[0]),
            iou=float(prediction.iou.reshape(-1)[0]),
            descriptor=self._descriptors.get(t),
            region=prediction.region,
        )

    def _memory(
        self,
        features: ImageFeatures,
        high_res_logits: torch.Tensor,
        object_score: torch.Tensor,
        binarize: bool,
    ) -> Memory:
        memory = self.model.encode_memory(features, high_res_logits, object_score, binarize)
        memory.features = memory.features.to(self.options.torch_storage_dtype)
        return memory


def _before_own_prompts(track: ObjectTrack, t: int, reverse: bool) -> bool:
    """Whether frame ``t`` comes before every prompted frame of ``track`` in the direction of travel."""
    return t > max(track.conditioning) if reverse else t < min(track.conditioning)


def fill_holes(logits: torch.Tensor, max_area: int) -> torch.Tensor:
    """``logits`` ``[B, 1, h, w]`` with every background region (logit <= 0, 8-connected) of at most
    ``max_area`` pixels set to 0.1, i.e. made foreground: SAM 2's ``fill_hole_area`` post-processing. As there,
    a region touching the border counts too."""
    background = (logits <= 0).cpu().numpy()
    filled = np.zeros_like(background)
    for index in np.ndindex(background.shape[:2]):
        regions, count = ndimage.label(background[index], structure=np.ones((3, 3), bool))
        areas = np.bincount(regions.ravel(), minlength=count + 1)
        small = areas <= max_area
        small[0] = False
        filled[index] = small[regions]
    if not filled.any():
        return logits
    return torch.where(
        torch.from_numpy(filled).to(logits.device), torch.tensor(0.1, dtype=logits.dtype), logits
    )
