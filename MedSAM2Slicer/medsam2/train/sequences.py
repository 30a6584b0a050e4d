"""Training sequences and their prompts, drawn from cached slices with one seeded generator.

A sequence is ``T`` cached slices of one source along one axis: consecutive cached slices in a random
direction (video-style tracking), or, with probability ``shuffle_prob``, random slices that contain the first
object, in random order (one-prompt segmentation of unrelated images). Up to ``max_objects`` objects present
on the first frame, each covering at least ``min_object_px`` pixels there, are tracked together. The first
frame's prompt is a mask (50 %), one positive click (25 %) or a box (25 %) for all of them; up to
``max_corrections`` later frames get one corrective click each.

With probability ``end_prob`` a consecutive sequence is one that runs past its objects' end: only objects
present on the first frame and absent from the last are drawn. Windows drawn at random seldom contain an
organ's end, yet stopping there is what the object score (and the memory it reads) must learn. With
probability ``memory_only_prob`` a sequence's tracked frames are decoded from memory alone, without the
chained box (``Sequence.memory_only``): the box otherwise says where the object is, and the memory learns
nothing it has to carry. With ``source_weights`` each sequence's source is drawn first, by weight, so that a
source gets its share of the sequences however often its slices lack a promptable object.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .data import SourceCache, object_masks

PROMPT_KINDS = ("mask", "click", "box")
PROMPT_PROBS = (0.5, 0.25, 0.25)
# Box corners are moved by up to this fraction of the box side (and at most BOX_NOISE_MAX_PX pixels at 256).
BOX_NOISE = 0.1
BOX_NOISE_MAX_PX = 20


@dataclass(frozen=True)
class SamplerOptions:
    frames: int = 8
    max_objects: int = 3
    shuffle_prob: float = 0.25
    max_corrections: int = 2
    # Objects smaller than this on the prompted first frame (pixels of the model input) are not drawn: a clinician
    # prompts a structure where it is well visible, and a sliver of a rib teaches the memory nothing.
    min_object_px: int = 0
    end_prob: float = 0.0
    memory_only_prob: float = 0.0
    # (source name, weight) pairs; the sources not named weigh 1. Without them, every try draws a source and
    # axis afresh, so a source whose slices seldom hold a promptable object (the lesions) gets fewer sequences
    # than its share of draws; with them, the source is drawn once by weight and only its axis is redrawn.
    source_weights: tuple[tuple[str, float], ...] = ()


@dataclass
class Sequence:
    """``features`` ``[T, C, h, w]``; ``masks`` ``[B, T, S, S]`` bool; ``prompt`` one of ``PROMPT_KINDS``;
    ``points`` ``[B, N, 2]`` and ``labels`` ``[B, N]`` of a click/box prompt (model pixels);
    ``corrections``: frames (> 0) that get a corrective click; ``consecutive``: neighbouring slices (False
    for the shuffled one-prompt sequences); ``memory_only``: tracked frames get no chained box."""

    source: str
    axis: int
    positions: list[int]
    features: torch.Tensor
    masks: torch.Tensor
    prompt: str
    points: torch.Tensor | None
    labels: torch.Tensor | None
    corrections: list[int]
    consecutive: bool = True
    memory_only: bool = False


class SequenceSampler:
    """Draws :class:`Sequence` s from the cached slices of ``caches``; all randomness comes from ``rng``."""

    def __init__(self, caches: list[SourceCache], options: SamplerOptions, rng: np.random.Generator) -> None:
        self.caches = caches
        self.options = options
        self.rng = rng
        weights = dict(options.source_weights)
        unknown = set(weights) - {c.name for c in caches}
        if unknown:
            raise ValueError(f"source weights for sources not trained on: {sorted(unknown)}")
        if weights and (min(weights.values()) < 0 or sum(weights.get(c.name, 1.0) for c in caches) <= 0):
            raise ValueError(f"source weights must be 0 or more, and not all 0: {options.source_weights}")
        self.source_weights = [weights.get(c.name, 1.0) for c in caches]

    def available(self) -> list[tuple[int, int, np.ndarray]]:
        """(cache index, axis, positions cached) with at least ``frames`` cached slices."""
        out = []
        for i, cache in enumerate(self.caches):
            for axis in range(3):
                done = np.nonzero(cache.done(axis))[0]
                if len(done) >= self.options.frames:
                    out.append((i, axis, done))
        return out

    def sample(self, max_tries: int = 50) -> Sequence:
        choices = self.available()
        if not choices:
            raise RuntimeError("no source has enough cached slices to make a training sequence")
        if self.options.source_weights:
            choices = self._weighted_source(choices)
        for _ in range(max_tries):
            ci, axis, done = choices[int(self.rng.integers(len(choices)))]
            sequence = self._try(self.caches[ci], axis, done)
            if sequence is not None:
                return sequence
        where = f" of {self.caches[choices[0][0]].name}" if self.options.source_weights else ""
        raise RuntimeError(f"no sequence{where} with an object on its first frame found in {max_tries} draws")

    def _weighted_source(
        self, choices: list[tuple[int, int, np.ndarray]]
    ) -> list[tuple[int, int, np.ndarray]]:
        """The ``choices`` of one source, drawn by ``options.source_weights``."""
        sources = sorted({ci for ci, _, _ in choices})
        p = np.array([self.source_weights[ci] for ci in sources], dtype=float)
        if p.sum() <= 0:
            raise RuntimeError("the sources with weight have too few cached slices for a training sequence")
        chosen = sources[int(self.rng.choice(len(sources), p=p / p.sum()))]
        return [c for c in choices if c[0] == chosen]

    def _try(self, cache: SourceCache, axis: int, done: np.ndarray) -> Sequence | None:
        t = self.options.frames
        shuffled = self.rng.random() < self.options.shuffle_prob
        if shuffled:
            positions = [int(done[self.rng.integers(len(done))])]
        else:
            runs = _consecutive_starts(done, t)
            if not len(runs):
                return None
            start = int(runs[self.rng.integers(len(runs))])
            positions = list(range(start, start + t))
            if self.rng.random() < 0.5:
                positions.reverse()
        # Drawn only when asked for, so that runs without it keep their random stream.
        past_end = not shuffled and self.options.end_prob > 0 and self.rng.random() < self.options.end_prob
        _, first_labels = cache.frame(axis, positions[0])
        present = [v for v in np.unique(first_labels).tolist() if v != 0]
        if not present:
            return None
        first = object_masks(first_labels, present)
        present = [v for v, m in zip(present, first) if m.any() and m.sum() >= self.options.min_object_px]
        if past_end:
            last = object_masks(cache.frame(axis, positions[-1])[1], present)
            present = [v for v, m in zip(present, last) if not m.any()]
        if not present:
            return None
        k = min(self.options.max_objects, len(present))
        objects = [present[i] for i in self.rng.choice(len(present), size=k, replace=False)]
        if shuffled:
            positions += self._slices_with(cache, axis, done, objects[0], positions[0], t - 1)
            if len(positions) < t:
                return None
        masks = np.stack([object_masks(cache.frame(axis, p)[1], objects) for p in positions], axis=1)
        prompt = PROMPT_KINDS[int(self.rng.choice(len(PROMPT_KINDS), p=PROMPT_PROBS))]
        points, labels = self._prompt_points(prompt, masks[:, 0])
        n_corr = int(self.rng.integers(self.options.max_corrections + 1))
        corrections = sorted(self.rng.choice(np.arange(1, t), size=n_corr, replace=False).tolist())
        memory_only = self.options.memory_only_prob > 0 and self.rng.random() < self.options.memory_only_prob
        return Sequence(
            source=cache.name,
            axis=axis,
            positions=positions,
            features=cache.read_features(axis, positions),
            masks=torch.from_numpy(masks),
            prompt=prompt,
            points=points,
            labels=labels,
            corrections=[int(c) for c in corrections],
            consecutive=not shuffled,
            memory_only=memory_only,
        )

    def _slices_with(
        self, cache: SourceCache, axis: int, done: np.ndarray, value: int, exclude: int, count: int
    ) -> list[int]:
        """Up to ``count`` random cached slices other than ``exclude`` where label ``value`` appears."""
        indices = cache.indices(axis)
        candidates = [
            int(p)
            for p in done
            if p != exclude and (np.take(cache.labels, int(indices[p]), axis=axis) == value).any()
        ]
        if len(candidates) < count:
            return []
        return [candidates[i] for i in self.rng.choice(len(candidates), size=count, replace=False)]

    def _prompt_points(
        self, prompt: str, first: np.ndarray
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Click or box prompts ``[B, N, 2]`` / ``[B, N]`` for the objects' first-frame masks ``[B, S, S]``."""
        if prompt == "mask":
            return None, None
        coords, kinds = [], []
        for mask in first:
            rows, cols = np.nonzero(mask)
            if prompt == "click":
                i = int(self.rng.integers(len(rows)))
                coords.append([[cols[i] + 0.5, rows[i] + 0.5]])
                kinds.append([1])
            else:
                coords.append(self._noisy_box(rows, cols, mask.shape[-1]))
                kinds.append([2, 3])
        return torch.tensor(coords, dtype=torch.float32), torch.tensor(kinds, dtype=torch.int32)

    def _noisy_box(self, rows: np.ndarray, cols: np.ndarray, size: int) -> list[list[float]]:
        x0, y0, x1, y1 = cols.min(), rows.min(), cols.max() + 1.0, rows.max() + 1.0
        limit = BOX_NOISE_MAX_PX * size / 256
        nx = min(BOX_NOISE * (x1 - x0), limit)
        ny = min(BOX_NOISE * (y1 - y0), limit)
        d = self.rng.uniform(-1, 1, size=4) * [nx, ny, nx, ny]
        box = np.clip([x0 + d[0], y0 + d[1], x1 + d[2], y1 + d[3]], 0, size)
        if box[2] <= box[0] + 1:
            box[0], box[2] = x0, x1
        if box[3] <= box[1] + 1:
            box[1], box[3] = y0, y1
        return [[float(box[0]), float(box[1])], [float(box[2]), float(box[3])]]

    def corrective_click(
        self, predicted: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One click per object in its error region: positive in a miss, negative in a false alarm.

        ``predicted``/``target``: ``[B, S, S]`` bool. The larger error kind is corrected; an object without
        error gets a positive click inside its target (or a negative one anywhere when it is absent).
        """
        coords, kinds = [], []
        for pred, gt in zip(predicted.cpu().numpy(), target.cpu().numpy()):
            missed, extra = gt & ~pred, pred & ~gt
            region, label = (missed, 1) if missed.sum() >= extra.sum() else (extra, 0)
            if not region.any():
                region, label = (gt, 1) if gt.any() else (np.ones_like(gt), 0)
            rows, cols = np.nonzero(region)
            i = int(self.rng.integers(len(rows)))
            coords.append([[cols[i] + 0.5, rows[i] + 0.5]])
            kinds.append([label])
        return torch.tensor(coords, dtype=torch.float32), torch.tensor(kinds, dtype=torch.int32)


def _consecutive_starts(done: np.ndarray, length: int) -> np.ndarray:
    """Positions ``p`` with ``p, p+1, ..., p+length-1`` all in the sorted array ``done``."""
    ok = set(done.tolist())
    return np.array([p for p in done.tolist() if all(p + i in ok for i in range(length))], dtype=int)
