"""Intensity preparation (MedSAM-2 paper, appendix C.1) and slice resizing.

CT is clipped to an intensity window and scaled to [0, 1]; MR and other modalities are clipped to their 0.5
and 99.5 percentiles and scaled to [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError

# CT windows as (level, width) in Hounsfield units.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "mediastinum": (50.0, 350.0),
}
DEFAULT_CT_WINDOW = "abdomen"
MODALITIES = ("auto", "ct", "mr", "other")

PERCENTILES = (0.5, 99.5)
# Above this fraction of zero voxels the zeros are background (outside the body or the field of view) and
# would drag the lower percentile to 0, so percentiles are taken over the non-zero voxels instead.
BACKGROUND_FRACTION = 0.3

# guess_modality looks at a strided sample of at most this many voxels.
_SAMPLE_SIZE = 1_000_000


def prepare_intensities(
    volume: np.ndarray,
    modality: str = "auto",
    window: str | tuple[float, float] | None = None,
) -> np.ndarray:
    """Intensities of ``volume`` (``[Z, Y, X]`` or ``[Y, X]``, any real dtype) as float32 in [0, 1].

    CT (``modality="ct"``, or ``"auto"`` when ``guess_modality`` says so) is clipped to ``window``: a name
    from ``WINDOW_PRESETS`` or a ``(level, width)`` pair, the abdomen soft-tissue window when ``None``.
    A window given for a non-CT modality is applied as well. Otherwise the volume is clipped to its 0.5 and
    99.5 percentiles, computed over the non-zero voxels when more than 30 % of the voxels are zero.
    The input is never modified.
    """
    return windowed_intensities(volume, modality, window)[0]


def windowed_intensities(
    volume: np.ndarray,
    modality: str = "auto",
    window: str | tuple[float, float] | None = None,
) -> tuple[np.ndarray, tuple[float, float]]:
    """:func:`prepare_intensities` and the ``(level, width)`` it clipped to (the percentiles' range included)."""
    values = _checked(volume)
    if modality not in MODALITIES:
        raise InputError(f"Unknown modality {modality!r}: expected one of {', '.join(MODALITIES)}")
    if modality == "auto":
        modality = _guess_modality(values)
    if window is not None or modality == "ct":
        level, width = _window(DEFAULT_CT_WINDOW if window is None else window)
        low, high = level - width / 2.0, level + width / 2.0
    else:
        low, high = _percentile_range(values)
    scaled = values.astype(np.float32)  # always a copy: the caller's array stays as it was
    np.clip(scaled, low, high, out=scaled)
    scaled -= np.float32(low)
    scaled /= np.float32(high - low)
    return scaled, ((low + high) / 2.0, high - low)


def guess_modality(volume: np.ndarray) -> str:
    """``"ct"`` when the intensities look like Hounsfield units, ``"other"`` otherwise.

    The rule: the values are whole numbers (integer dtype, or at least 95 % of sampled float values within
    0.01 of an integer), air is present (the minimum is -900 or lower, or at least 1 % of sampled voxels are
    below -500), and dense tissue is present (the maximum is 300 or higher). MR cannot be told apart from
    other modalities by intensity alone; both get the same percentile treatment.
    """
    return _guess_modality(_checked(volume))


def _guess_modality(values: np.ndarray) -> str:
    sample = values.ravel()[:: max(1, values.size // _SAMPLE_SIZE)]
    if np.issubdtype(sample.dtype, np.integer):
        whole = True
    else:
        whole = np.mean(np.abs(sample - np.round(sample)) <= 0.01) >= 0.95
    has_air = values.min() <= -900 or np.mean(sample < -500) >= 0.01
    return "ct" if whole and has_air and values.max() >= 300 else "other"


def resize_slices(frames: np.ndarray | torch.Tensor, size: int) -> np.ndarray | torch.Tensor:
    """Frames ``[T, H, W]`` resized to ``[T, size, size]`` (bilinear, no antialiasing, align_corners=False).

    Returns the same kind of array as given (numpy, or a torch tensor on the same device).
    """
    return _resize_last_two(frames, (size, size))


def resize_logits_to(logits: np.ndarray | torch.Tensor, size: Sequence[int]) -> np.ndarray | torch.Tensor:
    """Logits ``[T, h, w]`` (any leading axes) resized to ``[T, H, W]`` with ``size = (H, W)``.

    Bilinear with align_corners=False, so that a prediction made at model resolution lands on the exact
    pixel grid of the slice. Returns the same kind of array as given.
    """
    height, width = (int(s) for s in size)
    return _resize_last_two(logits, (height, width))


def _checked(volume: np.ndarray) -> np.ndarray:
    values = np.asarray(volume)
    if values.ndim not in (2, 3) or values.size == 0:
        raise InputError(f"Expected a [Z, Y, X] volume or a [Y, X] image, got shape {values.shape}")
    if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
        raise InputError(f"Expected real intensities, got dtype {values.dtype}")
    if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
        raise InputError("The volume has NaN or infinite values: expected finite intensities")
    if values.min() == values.max():
        raise InputError(
            f"The volume has the same intensity ({values.flat[0]}) everywhere: nothing to segment"
        )
    return values


def _window(window: str | tuple[float, float]) -> tuple[float, float]:
    if isinstance(window, str):
        if window not in WINDOW_PRESETS:
            raise InputError(f"Unknown window {window!r}: expected one of {', '.join(WINDOW_PRESETS)}")
        return WINDOW_PRESETS[window]
    try:
        level, width = (float(v) for v in window)
    except (TypeError, ValueError):
        raise InputError(f"A window is a preset name or a (level, width) pair, got {window!r}") from None
    if not (np.isfinite(level) and np.isfinite(width) and width > 0):
        raise InputError(f"Window width must be positive and finite, got (level={level}, width={width})")
    return level, width


def _percentile_range(values: np.ndarray) -> tuple[float, float]:
    pool = values[values != 0] if _background_is_large(values) else values
    low, high = (float(p) for p in np.percentile(pool, PERCENTILES))
    if high <= low:  # a few values dominate: fall back to the full range of the same voxels
        low, high = float(pool.min()), float(pool.max())
    if high <= low:
        low, high = float(values.min()), float(values.max())
    return low, high


def _background_is_large(values: np.ndarray) -> bool:
    return np.count_nonzero(values == 0) > BACKGROUND_FRACTION * values.size


def _resize_last_two(array: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray | torch.Tensor:
    if array.ndim < 2:
        raise InputError(f"Expected images with at least 2 axes, got shape {tuple(array.shape)}")
    is_numpy = isinstance(array, np.ndarray)
    tensor = torch.from_numpy(np.ascontiguousarray(array)) if is_numpy else array
    if not tensor.is_floating_point():
        tensor = tensor.float()
    leading = tensor.shape[:-2]
    flat = tensor.reshape(-1, 1, *tensor.shape[-2:])
    resized = F.interpolate(flat, size=size, mode="bilinear", align_corners=False, antialias=False)
    resized = resized.reshape(*leading, *size)
    return resized.numpy() if is_numpy else resized
