"""The votes of :func:`medsam2.volume.segment_volume`: every pass adds its probabilities on the slices it
visited, and a voxel's probability is their (weighted) mean over the passes that voted on it."""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

import numpy as np


class Aggregation(str, Enum):
    MEAN = "mean"
    MAJORITY = "majority"
    # The mean, each axis's votes on an object weighted by the model's mean predicted IoU on the slices of
    # that axis where it found the object: a view that cuts the object into thin strips predicts it worse.
    CONFIDENCE = "confidence"


class Votes:
    """Per-object running sums of the passes' probabilities (or positive votes) and of the number of votes.

    Votes are counted per object: a pass along one axis may track only some of the objects, and must not
    dilute the others' votes. A run along one axis collects its votes apart and adds them with a weight per
    object when it ends (:meth:`end_run`), which is 1 except for confidence aggregation.
    """

    def __init__(self, shape: tuple[int, ...], obj_ids: Iterable[int], aggregate: Aggregation) -> None:
        self.shape = shape
        self.aggregate = aggregate
        self.total = {i: np.zeros(shape, np.float32) for i in obj_ids}
        self.count = {i: np.zeros(shape, np.float32) for i in self.total}
        self._run: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _run_sums(self, obj_id: int) -> tuple[np.ndarray, np.ndarray]:
        if obj_id not in self._run:
            self._run[obj_id] = np.zeros(self.shape, np.float32), np.zeros(self.shape, np.float32)
        return self._run[obj_id]

    def add(
        self,
        axis: int,
        index: int,
        probabilities: dict[int, np.ndarray],
        weights: dict[int, float] | None = None,
    ) -> None:
        """Add one pass's result on slice ``index`` of ``axis``, each object's counting ``weights`` (default 1)."""
        where = slice_index(axis, index)
        for obj_id, prob in probabilities.items():
            vote = (prob > 0.5).astype(np.float32) if self.aggregate is Aggregation.MAJORITY else prob
            weight = 1.0 if weights is None else weights.get(obj_id, 1.0)
            total, count = self._run_sums(obj_id)
            total[where] += weight * vote
            count[where] += weight

    def add_background(self, axis: int, obj_id: int, indices: Iterable[int]) -> None:
        """A background vote for ``obj_id`` on slices ``indices`` of ``axis``, which its passes did not reach."""
        _, count = self._run_sums(obj_id)
        for index in indices:
            count[slice_index(axis, index)] += 1

    def end_run(self, weights: dict[int, float]) -> None:
        """Add the run's votes, each object's weighted by ``weights`` (default 1)."""
        for obj_id, (total, count) in self._run.items():
            weight = weights.get(obj_id, 1.0)
            self.total[obj_id] += weight * total
            self.count[obj_id] += weight * count
        self._run = {}

    def result(self) -> dict[int, np.ndarray]:
        return {
            obj_id: np.divide(
                total, self.count[obj_id], out=np.zeros_like(total), where=self.count[obj_id] > 0
            )
            for obj_id, total in self.total.items()
        }


def slice_index(axis: int, index: int) -> tuple:
    """Index of slice ``index`` along ``axis`` in a ``[Z, Y, X]`` array."""
    where: list = [slice(None), slice(None)]
    where.insert(axis, index)
    return tuple(where)
