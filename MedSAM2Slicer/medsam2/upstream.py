"""``pipeline="upstream"``: a volume segmented the way bowang-lab's MedSAM2 inference scripts do it.

For comparing with numbers published for the MedSAM2 checkpoints. What differs from our own pipeline
(``medsam2.volume``), step by step:

- intensities: clipped to the CT window (MR and others: to the 0.5 / 99.5 percentiles of the voxels > 0, zeros
  kept at 0), then scaled by the clipped volume's own minimum and maximum to 0-255 and truncated to uint8;
- each slice is resized as an 8-bit RGB image with Pillow's default (bicubic) filter, then scaled to [0, 1]
  and normalised with the ImageNet statistics;
- the prompt's axis only: forward from the prompted slice, then the state is reset, the prompt given again,
  and reverse; a voxel is the object's when either direction says so;
- SAM 2's recent-frames memory, the low-resolution masks' holes of up to 8 pixels filled
  (``fill_hole_area=8``), masks from clicks and boxes binarised for memory (as our Session always does);
- the largest 26-connected component of the object is kept;
- on CUDA, inference under bfloat16 autocast with memory features stored in bfloat16.

Each object is segmented on its own, as the upstream scripts segment one lesion at a time.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from skimage import measure

from .configs import ModelConfig
from .errors import Cancelled, InputError
from .frames import PIXEL_MEAN, PIXEL_STD, FrameStack
from .memory import MemoryOptions
from .model.sam2 import SAM2Model
from .preprocess import DEFAULT_CT_WINDOW, MODALITIES, PERCENTILES, _window, guess_modality
from .prompts import Prompt
from .session import Session

FILL_HOLE_AREA = 8
ProgressCallback = Callable[[int, int, str], None]


def upstream_intensities(
    volume: np.ndarray, modality: str = "auto", window: str | tuple[float, float] | None = None
) -> np.ndarray:
    """``[Z, Y, X]`` intensities as the upstream scripts prepare them: uint8, see the module docstring.

    ``window`` as in :func:`medsam2.preprocess.prepare_intensities` (the abdomen window when ``None``).
    """
    if modality not in MODALITIES:
        raise InputError(f"Unknown modality {modality!r}: expected one of {', '.join(MODALITIES)}")
    if modality == "auto":
        modality = guess_modality(volume)
    values = np.asarray(volume, dtype=np.float64)  # a copy in the upstream scripts' precision
    if window is not None or modality == "ct":
        level, width = _window(DEFAULT_CT_WINDOW if window is None else window)
        low, high = level - width / 2, level + width / 2
    else:
        foreground = values[values > 0]
        if foreground.size == 0:
            raise InputError("The volume has no voxel above 0: the upstream MR preparation needs some")
        low, high = np.percentile(foreground, PERCENTILES)
    clipped = np.clip(values, low, high)
    span = clipped.max() - clipped.min()
    if span == 0:
        raise InputError(f"The volume is constant within the intensity range [{low:g}, {high:g}]")
    scaled = (clipped - clipped.min()) / span * 255.0
    if not (window is not None or modality == "ct"):
        scaled[values == 0] = 0
    return scaled.astype(np.uint8)  # truncation, as np.uint8(...) upstream


class UpstreamFrames(FrameStack):
    """uint8 ``[T, H, W]`` slices resized as 8-bit RGB images with Pillow's bicubic filter (the upstream
    resize); everything else, coordinates and the way back to the slice size, is as in :class:`FrameStack`."""

    def __init__(self, frames: np.ndarray, config: ModelConfig) -> None:
        if frames.dtype != np.uint8 or frames.ndim != 3:
            raise InputError(f"Upstream frames are uint8 [T, H, W], got {frames.dtype} {frames.shape}")
        super().__init__(frames, config)

    def model_input(
        self, index: int, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        image = Image.fromarray(self.frames[index]).convert("RGB")
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size))  # Pillow's default filter: bicubic
        # float64 as upstream, which converts to float32 only when the model reads the frame
        rgb = np.asarray(image).transpose(2, 0, 1) / 255.0
        normalised = (rgb - np.reshape(PIXEL_MEAN, (3, 1, 1))) / np.reshape(PIXEL_STD, (3, 1, 1))
        return torch.from_numpy(normalised).float().unsqueeze(0).to(device, dtype)


def segment_volume_upstream(
    model: SAM2Model,
    volume: np.ndarray,
    prompts: Sequence[Prompt],
    modality: str = "auto",
    window: str | tuple[float, float] | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
):
    """Segment the prompted objects through ``volume`` ``[Z, Y, X]`` as upstream MedSAM2 does.

    Returns a :class:`medsam2.VolumeResult` whose probabilities are the binary masks (0 or 1).
    Prompts of one object must lie on one axis; several prompted slices of an object are all given
    before propagating (forward from the first, reverse from the last).
    """
    from .volume import VolumeResult

    started = time.perf_counter()
    intensities = upstream_intensities(volume, modality, window)
    by_object: dict[int, list[Prompt]] = {}
    for p in prompts:
        by_object.setdefault(p.obj_id, []).append(p)
    for obj_id, own in by_object.items():
        if len({p.axis for p in own}) > 1:
            raise InputError(
                f"The upstream pipeline tracks along one axis: object {obj_id} has prompts on several"
            )
    total = sum(volume.shape[own[0].axis] + 1 for own in by_object.values())
    done = 0

    def tick(message: str) -> None:
        nonlocal done
        if cancel is not None and cancel.is_set():
            raise Cancelled("Segmentation was cancelled; nothing was returned")
        done += 1
        if progress is not None:
            progress(done, total, message)

    masks = {}
    with _upstream_precision(model) as storage:
        for obj_id, own in sorted(by_object.items()):
            axis = own[0].axis
            frames = UpstreamFrames(np.ascontiguousarray(np.moveaxis(intensities, axis, 0)), model.config)
            session = Session(
                model, frames, memory=MemoryOptions(policy="recent", storage_dtype=storage),
                fill_hole_area=FILL_HOLE_AREA,
            )  # fmt: skip
            found = np.zeros(frames.frames.shape, bool)
            first, last = min(p.index for p in own), max(p.index for p in own)
            for start, reverse in ((first, False), (last, True)):
                session.reset()
                for p in own:
                    session.add_prompt(p.index, points=p.points, labels=p.labels, box=p.box, mask=p.mask)
                for t, logits in session.propagate(start=start, reverse=reverse):
                    found[t] |= logits[1] > 0
                    tick(f"object {obj_id}, {'reverse' if reverse else 'forward'}")
            masks[obj_id] = np.moveaxis(_largest_component(found), 0, axis)

    labels = np.zeros(volume.shape, np.uint8 if max(masks) < 256 else np.uint16)
    for obj_id, mask in masks.items():
        labels[mask] = obj_id
    return VolumeResult(
        labels=labels,
        probabilities={obj_id: mask.astype(np.float32) for obj_id, mask in masks.items()},
        frames_visited={"upstream": done},
        timings={"total": time.perf_counter() - started},
    )


@contextlib.contextmanager
def _upstream_precision(model: SAM2Model) -> Iterator[str]:
    """bfloat16 autocast and memory storage on CUDA, as upstream; the model's own precision elsewhere."""
    if model.device.type != "cuda":
        yield "bfloat16" if model.autocast_dtype == torch.bfloat16 else "float32"
        return
    previous = model.autocast_dtype
    model.autocast_dtype = torch.bfloat16
    try:
        yield "bfloat16"
    finally:
        model.autocast_dtype = previous


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a ``[Z, Y, X]`` mask (the mask itself when empty)."""
    if not mask.any():
        return mask
    regions = measure.label(mask)  # full connectivity, as upstream
    return regions == np.argmax(np.bincount(regions.ravel())[1:]) + 1
