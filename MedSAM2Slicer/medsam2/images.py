"""One-prompt 2D segmentation: prompt one template image, segment the same structure in unrelated images."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import Cancelled, InputError
from .memory import MemoryOptions
from .model.sam2 import SAM2Model
from .session import Session


def segment_images(
    model: SAM2Model,
    images: Sequence[np.ndarray],
    template: int = 0,
    points: Sequence[Sequence[float]] | None = None,
    labels: Sequence[int] | None = None,
    box: Sequence[float] | None = None,
    mask: np.ndarray | None = None,
    memory: MemoryOptions | None = None,
    seed: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
    cancel: threading.Event | None = None,
) -> list[np.ndarray]:
    """Boolean masks, one per image, of the structure prompted on ``images[template]``.

    Images may differ in size and be gray ``[H, W]`` or colour ``[H, W, 3]`` (an alpha channel is dropped);
    prompt coordinates are pixels of the template. The images are treated as a sequence that starts with the
    template: each is resized to the template's size, tracked with the template (and, through the memory
    bank, the confident earlier results) as memory, and its mask resized back to its own size.
    """
    frames = [_as_rgb(image, i) for i, image in enumerate(images)]
    if not frames:
        raise InputError("segment_images needs at least one image")
    if not 0 <= template < len(frames):
        raise InputError(f"template index {template} is outside the {len(frames)} images")
    order = [template] + [i for i in range(len(frames)) if i != template]
    height, width = frames[template].shape[:2]
    stack = np.stack([_resize(frames[i], (height, width)) for i in order])
    session = Session(model, stack, memory=memory or MemoryOptions(), seed=seed, consecutive=False)
    session.add_prompt(0, obj_id=1, points=points, labels=labels, box=box, mask=mask)
    masks: list[np.ndarray | None] = [None] * len(frames)
    for t, logits in session.propagate(start=0):
        if cancel is not None and cancel.is_set():
            raise Cancelled("One-prompt segmentation was cancelled; nothing was returned")
        original = order[t]
        size = frames[original].shape[:2]
        masks[original] = _resize(logits[1][..., None], size)[..., 0] > 0
        if progress is not None:
            progress(t + 1, len(frames), "images")
    return masks


def _as_rgb(image: np.ndarray, index: int) -> np.ndarray:
    """An image as float32 ``[H, W, 3]`` in [0, 1]: uint8 divided by 255, other types min-max scaled."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 2:
        raise InputError(f"Image {index} must be [H, W] gray or [H, W, 3] colour, got shape {image.shape}")
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise InputError(f"Image {index} must hold numbers, got dtype {image.dtype}")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255
    image = image.astype(np.float32)
    if not np.isfinite(image).all():
        raise InputError(f"Image {index} has NaN or infinite values")
    low, high = float(image.min()), float(image.max())
    if high == low:
        raise InputError(f"Image {index} has the same value everywhere: nothing to segment")
    return (image - low) / (high - low)


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[H, W, C]`` float -> ``[h, w, C]`` (bilinear, antialiased when shrinking)."""
    if image.shape[:2] == tuple(size):
        return image
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    t = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
    return t[0].permute(1, 2, 0).numpy()
