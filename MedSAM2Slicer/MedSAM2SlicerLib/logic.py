"""Slicer-side logic: volume and prompts in, one segment out, with corrections re-propagated.

A run has three steps so that the slow one can leave the Slicer process (MRML is not thread-safe, and inside
Slicer a Python thread crawls: see :mod:`MedSAM2SlicerLib.engines`):

1. ``prepare`` (GUI thread) copies the voxels, geometry and prompts out of the scene into a ``Request``;
2. the engine segments them: ``start`` hands the request to an engine server and returns a run that the GUI
   polls from a timer; ``run`` waits for the result (scripts, tests), on a server or in this process;
3. ``apply`` (GUI thread) writes the result into the segment.

``segment`` does all three in a row. Nothing in the scene changes before ``apply``, so a cancelled or failed
run leaves the segmentation as it was.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from medsam2.errors import InputError
from medsam2.prompts import Prompt

from .engines import ServerEngine, ServerRun
from .geometry import VolumeGeometry, volume_array, volume_geometry
from .history import UNDO_STATES, OwnUndo
from .prompts import prompts_from_nodes
from .segment_writer import SegmentWriter
from .segments import read_segment_mask
from .window import WindowSource, window_options

ProgressCallback = Callable[[int, int, str], None]


@dataclass
class Request:
    """Everything one engine run needs, copied out of the scene: no MRML access while it runs.

    ``kept_slices`` are slices along ``kept_axis`` (corrections drawn by the user) that the written result
    takes verbatim from ``kept_masks``, whatever the engine said there. ``options`` hold plain values only
    (strings, numbers, ``(level, width)`` pairs, ``MemoryOptions``), so that they can be sent to an engine
    server.
    """

    volume: np.ndarray  # [K, J, I], a private copy
    geometry: VolumeGeometry
    prompts: list[Prompt]
    options: dict
    segmentation_node: object
    segment_id: str | None
    volume_node_id: str
    threshold: float | None = None
    kept_axis: int = 0
    kept_slices: list[int] = field(default_factory=list)
    kept_masks: list[np.ndarray] = field(default_factory=list)

    @property
    def obj_id(self) -> int:
        return self.prompts[0].obj_id


@dataclass
class Correction:
    """What ``correct`` did: the segment it re-propagated and the edited slices it started from."""

    segment_id: str
    axis: int
    slices: list[int]


@dataclass
class _RunRecord:
    """A run written into a segment, to tell user edits apart and to re-use its prompts."""

    volume_node_id: str
    prompts: list[Prompt]
    options: dict
    threshold: float | None
    shape: tuple[int, int, int]
    box: tuple[slice, ...]  # the written mask's bounding box (empty slices for an empty mask)
    written: np.ndarray  # np.packbits of the written mask inside ``box``

    @classmethod
    def of(cls, request: Request, mask: np.ndarray) -> _RunRecord:
        found = np.nonzero(mask)
        box = tuple(slice(int(a.min()), int(a.max()) + 1) if a.size else slice(0, 0) for a in found)
        return cls(
            request.volume_node_id,
            list(request.prompts),
            request.options,
            request.threshold,
            tuple(mask.shape),
            box,
            np.packbits(mask[box].ravel()),
        )

    def written_mask(self) -> np.ndarray:
        full = np.zeros(self.shape, dtype=bool)
        inside = full[self.box]
        inside[...] = np.unpackbits(self.written, count=inside.size).astype(bool).reshape(inside.shape)
        return full


class SegmentationLogic:
    """Segments one object through a volume from prompts on one slice, and writes it into a segment.

    ``model`` is a registry name, a checkpoint path (both loaded with ``medsam2.load_model`` on first use) or
    an already loaded model. ``engine`` is where runs go: a :class:`~MedSAM2SlicerLib.engines.ServerEngine`
    (what the Slicer module uses; it loads the model named by ``model`` itself), or a callable with the
    signature of ``medsam2.segment_volume`` run in this process (default ``medsam2.segment_volume``, looked up
    at call time; for scripts and tests). ``history`` is where each write is saved as an undo step
    (:mod:`MedSAM2SlicerLib.history`): inside Slicer the Segment Editor's, else a history of its own.
    """

    def __init__(
        self,
        model="medsam2-lite",
        device: str = "auto",
        engine: Callable | None = None,
        history=None,
    ) -> None:
        self.model = model
        self.device = device
        self.image_size: int | None = None
        self.engine = engine
        self.writer = SegmentWriter(history if history is not None else OwnUndo())
        self._loaded_model = None if isinstance(model, str) or hasattr(model, "__fspath__") else model
        self._model_lock = threading.Lock()
        # Runs written into each segment, newest last: an undo (here or in the Segment Editor) may bring an
        # earlier one back, so corrections are compared with the one the segment is closest to.
        self._runs: dict[tuple[str, str], list[_RunRecord]] = {}

    # -- prompts --------------------------------------------------------------------------------------------

    def prompts_from_nodes(
        self,
        volume_node,
        points_node=None,
        roi_node=None,
        mask_segment=None,
        slice_axis=None,
        negative_points_node=None,
    ) -> list[Prompt]:
        """Markups in RAS and a segment on a slice -> engine prompts (see :mod:`MedSAM2SlicerLib.prompts`)."""
        return prompts_from_nodes(
            volume_node,
            points_node,
            roi_node,
            mask_segment,
            slice_axis,
            negative_points_node=negative_points_node,
        )

    # -- segmenting -----------------------------------------------------------------------------------------

    def segment(
        self,
        volume_node,
        segmentation_node,
        prompts: Sequence[Prompt],
        segment_id: str | None = None,
        options: dict | None = None,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        threshold: float | None = None,
    ) -> str:
        """Segment the prompted object through the volume into ``segment_id`` (new if None); returns its ID.

        ``options`` are keyword arguments of ``medsam2.segment_volume``; ``threshold`` (0..1) cuts the
        object's probability map instead of taking the engine's labels.
        """
        request = self.prepare(volume_node, segmentation_node, prompts, segment_id, options, threshold)
        return self.apply(request, self.run(request, progress, cancel))

    def prepare(
        self,
        volume_node,
        segmentation_node,
        prompts: Sequence[Prompt],
        segment_id: str | None = None,
        options: dict | None = None,
        threshold: float | None = None,
    ) -> Request:
        """Copy what a run needs out of the scene (GUI thread).

        Without ``window`` and ``modality`` in ``options``, the model sees the volume as Slicer shows it: a CT
        through its display node's window (:func:`~MedSAM2SlicerLib.window.window_options`).
        """
        prompts = list(prompts)
        if not prompts:
            raise InputError("No prompts: place points, an ROI or choose a mask segment first")
        object_ids = sorted({p.obj_id for p in prompts})
        if len(object_ids) > 1:
            raise InputError(
                f"The prompts are for objects {object_ids}; one segment holds one object, so segment them "
                "one at a time"
            )
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise InputError(f"threshold must be between 0 and 1, got {threshold}")
        geometry = volume_geometry(volume_node)
        for prompt in prompts:
            prompt.check_fits(geometry.shape)
        options = dict(options or {})
        if "window" not in options and "modality" not in options:
            options.update(window_options(volume_node, WindowSource.VIEW))
        return Request(
            volume=volume_array(volume_node),
            geometry=geometry,
            prompts=prompts,
            options=options,
            segmentation_node=segmentation_node,
            segment_id=segment_id,
            volume_node_id=volume_node.GetID(),
            threshold=threshold,
        )

    def start(self, request: Request) -> ServerRun:
        """Hand ``request`` to the engine server and return the run at once, for the GUI to poll (GUI thread)."""
        if not isinstance(self.engine, ServerEngine):
            raise TypeError("Only an engine server runs a segmentation in the background; call run() instead")
        model = os.fspath(self.model) if hasattr(self.model, "__fspath__") else self.model
        return self.engine.submit(request, model, self.device, self.image_size)

    def run(
        self,
        request: Request,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ):
        """Segment ``request`` and wait for the result. Raises ``medsam2.Cancelled`` when ``cancel`` is set."""
        if isinstance(self.engine, ServerEngine):
            return self.start(request).wait(progress, cancel)
        engine = self.engine
        if engine is None:
            import medsam2

            engine = medsam2.segment_volume
        return engine(
            self.loaded_model(),
            request.volume,
            request.prompts,
            spacing=request.geometry.spacing,
            progress=progress,
            cancel=cancel,
            **request.options,
        )

    def apply(self, request: Request, result) -> str:
        """Write the engine's result into the segment (GUI thread); returns the segment ID."""
        mask = object_mask(result, request.obj_id, request.geometry.shape, request.threshold)
        for index, kept in zip(request.kept_slices, request.kept_masks, strict=True):
            _put_slice(mask, request.kept_axis, index, kept)
        node = request.segmentation_node
        existed = (
            bool(request.segment_id) and node.GetSegmentation().GetSegment(request.segment_id) is not None
        )
        scene = node.GetScene()
        segment_id = self.writer.write(
            node,
            mask,
            request.geometry,
            request.segment_id,
            volume_node=scene.GetNodeByID(request.volume_node_id) if scene is not None else None,
        )
        runs = self._runs.setdefault((node.GetID(), segment_id), [])
        if not existed:
            runs.clear()  # a segment removed earlier may have had this ID
        runs.append(_RunRecord.of(request, mask))
        del runs[:-UNDO_STATES]  # older runs than the history can bring back
        return segment_id

    def set_model(self, model, device: str = "auto", image_size: int | None = None) -> None:
        """Use ``model`` (registry name, checkpoint path or a loaded model) on ``device`` from the next run;
        ``image_size`` is the input size of a checkpoint file that its digest does not identify.

        A loaded model is dropped (its memory freed) unless the same source and device are asked for again.
        """
        with self._model_lock:
            same = (self.model, self.device, self.image_size) == (model, device, image_size)
            if same and self._loaded_model is not None:
                return
            self.model, self.device, self.image_size = model, device, image_size
            self._loaded_model = None if isinstance(model, str) or hasattr(model, "__fspath__") else model

    def unload_model(self) -> None:
        """Drop a model loaded from a name or file (frees its memory); the next run loads it again."""
        with self._model_lock:
            if isinstance(self.model, str) or hasattr(self.model, "__fspath__"):
                self._loaded_model = None

    def loaded_model(self):
        """The model, loaded on first use (thread-safe)."""
        with self._model_lock:
            if self._loaded_model is None:
                import medsam2

                self._loaded_model = medsam2.load_model(
                    self.model, device=self.device, image_size=self.image_size
                )
            return self._loaded_model

    def can_undo(self, segmentation_node) -> bool:
        return self.writer.can_undo(segmentation_node)

    def undo(self, segmentation_node) -> bool:
        """Undo the latest step of the segmentation's history (a MedSAM2 write or an edit made after it)."""
        return self.writer.undo(segmentation_node)

    # -- corrections ----------------------------------------------------------------------------------------

    def correct(
        self,
        volume_node,
        segmentation_node,
        segment_id: str,
        slices: Sequence[int] | None = None,
        axis: int | str | None = None,
        options: dict | None = None,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> Correction:
        """Re-propagate one segment from slices the user corrected; other segments are not touched.

        See :meth:`prepare_correction` for how the corrected slices are found and used.
        """
        request, correction = self.prepare_correction(
            volume_node, segmentation_node, segment_id, slices, axis, options
        )
        self.apply(request, self.run(request, progress, cancel))
        return correction

    def prepare_correction(
        self,
        volume_node,
        segmentation_node,
        segment_id: str,
        slices: Sequence[int] | None = None,
        axis: int | str | None = None,
        options: dict | None = None,
    ) -> tuple[Request, Correction]:
        """A run that re-segments ``segment_id`` starting from its corrected slices (GUI thread).

        Each corrected slice, as the segment now shows it, becomes a mask prompt, or, erased to empty, a
        prompt that the object is absent there (the run then does not carry it across that slice); prompts
        of the segment's last run on other slices are kept, so the first clicks still count. The corrected
        slices are written back exactly as drawn. ``slices`` (along ``axis``, default the last run's prompt
        axis) can be given; when None they are found by comparing the segment with what the last run wrote,
        along the axis where the edits touch the fewest slices. "The last run" is the run on this volume
        whose result the segment differs from least (the newest of equals): after an undo that is the run
        the undo went back to.
        """
        geometry = volume_geometry(volume_node)
        current = read_segment_mask(segmentation_node, segment_id, geometry)
        record = _closest_run(
            self._runs.get((segmentation_node.GetID(), segment_id), []), current, volume_node.GetID()
        )
        first_axis = record.prompts[0].axis if record else geometry.view_axis("axial")
        if slices is None:
            if record is None:
                raise InputError(
                    f"Segment '{segment_id}' was not made by MedSAM2 here, so its edits cannot be found: "
                    "pass the slices you corrected"
                )
            axis, slices = _edited_slices(
                current ^ record.written_mask(), first_axis, segment_id, axis, geometry
            )
        else:
            axis = first_axis if axis is None else geometry.resolve_axis(axis)
            slices = sorted({int(s) for s in slices})
            if not slices or min(slices) < 0 or max(slices) >= geometry.shape[axis]:
                raise InputError(f"Corrected slices {slices} must lie in 0..{geometry.shape[axis] - 1}")
        masks = [np.take(current, index, axis=axis) for index in slices]
        obj_id = record.prompts[0].obj_id if record else 1
        # A slice erased to empty says the object is not there: tracking must not carry it across.
        prompts = [
            Prompt(axis=axis, index=i, obj_id=obj_id, mask=m)
            if m.any()
            else Prompt(axis=axis, index=i, obj_id=obj_id, absent=True)
            for i, m in zip(slices, masks, strict=True)
        ]
        if record is not None:
            prompts = [p for p in record.prompts if not (p.axis == axis and p.index in slices)] + prompts
        if all(p.absent for p in prompts):
            raise InputError(
                f"Segment '{segment_id}' is empty on the corrected slices {slices}: nothing to start from"
            )
        merged_options = {**(record.options if record else {}), **(options or {})}
        request = self.prepare(
            volume_node,
            segmentation_node,
            prompts,
            segment_id,
            merged_options,
            record.threshold if record else None,
        )
        request.kept_axis, request.kept_slices, request.kept_masks = axis, slices, masks
        return request, Correction(segment_id, axis, slices)


def object_mask(
    result, obj_id: int, shape: tuple[int, int, int], threshold: float | None = None
) -> np.ndarray:
    """Boolean ``[K, J, I]`` mask of one object of an engine result.

    Its voxels in ``result.labels``, or where its probability is at least ``threshold`` when one is given.
    """
    if threshold is None:
        labels = np.asarray(result.labels)
        if labels.shape != tuple(shape):
            raise RuntimeError(f"The engine returned labels of shape {labels.shape}, expected {tuple(shape)}")
        return labels == obj_id
    probabilities = result.probabilities.get(obj_id)
    if probabilities is None:
        raise RuntimeError(f"The engine returned no probabilities for object {obj_id}")
    probabilities = np.asarray(probabilities)
    if probabilities.shape != tuple(shape):
        raise RuntimeError(
            f"The engine returned probabilities of shape {probabilities.shape}, expected {shape}"
        )
    return probabilities >= threshold


def _closest_run(runs: list[_RunRecord], current: np.ndarray, volume_node_id: str) -> _RunRecord | None:
    """The run on ``volume_node_id`` whose written mask differs from ``current`` in the fewest voxels."""
    candidates = [r for r in runs if r.volume_node_id == volume_node_id and r.shape == current.shape]
    if not candidates:
        return None  # none, or segmented on another volume: its prompts do not apply here
    differences = [int(np.count_nonzero(r.written_mask() != current)) for r in candidates]
    best = min(differences)
    return candidates[max(i for i, d in enumerate(differences) if d == best)]


def _put_slice(volume: np.ndarray, axis: int, index: int, image: np.ndarray) -> None:
    where = [slice(None)] * 3
    where[axis] = index
    volume[tuple(where)] = image


def _edited_slices(
    edits: np.ndarray, first_axis: int, segment_id: str, axis: int | str | None, geometry: VolumeGeometry
) -> tuple[int, list[int]]:
    """Axis and slices holding the user's edits (voxels that differ from what the last run wrote)."""
    if not edits.any():
        raise InputError(
            f"Segment '{segment_id}' has not been edited since MedSAM2 wrote it: nothing to propagate"
        )

    def touched(a: int) -> list[int]:
        others = tuple(b for b in range(3) if b != a)
        return np.flatnonzero(edits.any(axis=others)).tolist()

    if axis is not None:
        axis = geometry.resolve_axis(axis)
    else:
        # Edits drawn in one view touch few slices along its normal and many along the other axes.
        order = [first_axis] + [a for a in range(3) if a != first_axis]
        axis = min(order, key=lambda a: len(touched(a)))
    return axis, touched(axis)
