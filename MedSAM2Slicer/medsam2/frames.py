"""Frames as the model sees them: validation, lazy resizing and normalisation, and the way back."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .configs import ModelConfig
from .errors import InputError

# ImageNet statistics, with which every SAM 2 checkpoint was trained.
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)


class FrameStack:
    """A ``[T, H, W]`` (gray, float in [0, 1]) or ``[T, H, W, 3]`` (uint8, or float in [0, 1]) sequence.

    Frames are converted one at a time when the model asks for them, so a long volume is never copied whole.
    The model's input conventions come from its config: stretched to ``S x S`` with ImageNet statistics
    (SAM 2), or longest side to ``S``, zero-padded at the bottom and right, min-max scaled (LiteMedSAM).
    """

    def __init__(self, frames: np.ndarray | torch.Tensor, config: ModelConfig) -> None:
        if isinstance(frames, torch.Tensor):
            frames = frames.detach().cpu().numpy()
        frames = np.asarray(frames)
        if frames.ndim == 4 and frames.shape[-1] == 3:
            self.rgb = True
        elif frames.ndim == 3:
            self.rgb = False
        else:
            raise InputError(
                f"Frames must be [T, H, W] (gray) or [T, H, W, 3] (RGB), got an array of shape {frames.shape}"
            )
        if frames.shape[0] == 0 or frames.shape[1] < 2 or frames.shape[2] < 2:
            raise InputError(f"Frames must hold at least one image of 2x2 pixels, got shape {frames.shape}")
        if not (np.issubdtype(frames.dtype, np.integer) or np.issubdtype(frames.dtype, np.floating)):
            raise InputError(f"Frames must hold real numbers, got dtype {frames.dtype}")
        if np.issubdtype(frames.dtype, np.floating) and not np.isfinite(frames).all():
            raise InputError("Frames contain NaN or infinite values")
        self.frames = frames
        self.scale = 1 / 255 if frames.dtype == np.uint8 else 1.0
        self.image_size = size = config.image_size
        self.minmax = config.input_normalization == "minmax"
        if config.input_resize == "longest_side":
            factor = size / max(self.height, self.width)
            self.content = (int(self.height * factor + 0.5), int(self.width * factor + 0.5))
        else:
            self.content = (size, size)

    def __len__(self) -> int:
        return self.frames.shape[0]

    @property
    def height(self) -> int:
        return self.frames.shape[1]

    @property
    def width(self) -> int:
        return self.frames.shape[2]

    def model_input(
        self, index: int, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Frame ``index`` resized to ``[1, 3, S, S]`` and normalised with the ImageNet statistics."""
        image = torch.from_numpy(np.ascontiguousarray(self.frames[index])).to(device, torch.float32)
        image = image * self.scale
        image = image.permute(2, 0, 1) if self.rgb else image.unsqueeze(0).expand(3, -1, -1)
        image = image.unsqueeze(0)
        size = self.image_size
        if image.shape[-2:] != (size, size):
            image = F.interpolate(
                image, size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )
        mean = torch.tensor(PIXEL_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(PIXEL_STD, device=device).view(1, 3, 1, 1)
        return ((image - mean) / std).to(dtype)

    def to_model_coords(self, xy: np.ndarray) -> np.ndarray:
        """Pixel ``(x, y)`` of the frame -> coordinates in the model's ``S x S`` input."""
        return np.asarray(xy, dtype=np.float64) / [self.width, self.height] * self.image_size

    def mask_to_model(self, mask: np.ndarray, device: torch.device) -> torch.Tensor:
        """A boolean ``[H, W]`` mask -> binary ``[1, 1, S, S]`` float mask."""
        m = torch.as_tensor(np.asarray(mask, dtype=np.float32), device=device)[None, None]
        size = self.image_size
        if m.shape[-2:] != (size, size):
            m = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            m = (m >= 0.5).float()
        return m

    def logits_to_frame(self, low_res_logits: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 1, h, w]`` at any resolution -> ``[B, H, W]`` at the frame's size (bilinear)."""
        out = F.interpolate(
            low_res_logits.float(), size=(self.height, self.width), mode="bilinear", align_corners=False
        )
        return out[:, 0]
