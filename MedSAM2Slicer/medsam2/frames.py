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
        """Frame ``index`` as the model's normalised input ``[1, 3, S, S]``."""
        image = torch.from_numpy(np.ascontiguousarray(self.frames[index])).to(device, torch.float32)
        image = image * self.scale
        image = image.permute(2, 0, 1) if self.rgb else image.unsqueeze(0).expand(3, -1, -1)
        image = self._resize(image.unsqueeze(0))
        if self.minmax:
            low, high = image.amin(), image.amax()
            image = (image - low) / (high - low).clamp(min=1e-8)
        else:
            mean = torch.tensor(PIXEL_MEAN, device=device).view(1, 3, 1, 1)
            std = torch.tensor(PIXEL_STD, device=device).view(1, 3, 1, 1)
            image = (image - mean) / std
        return self._pad(image).to(dtype)

    def _resize(self, image: torch.Tensor) -> torch.Tensor:
        if tuple(image.shape[-2:]) == self.content:
            return image
        return F.interpolate(image, size=self.content, mode="bilinear", align_corners=False, antialias=True)

    def _pad(self, image: torch.Tensor) -> torch.Tensor:
        h, w = self.content
        return F.pad(image, (0, self.image_size - w, 0, self.image_size - h))

    def to_model_coords(self, xy: np.ndarray) -> np.ndarray:
        """Pixel ``(x, y)`` of the frame -> coordinates in the model's ``S x S`` input."""
        h, w = self.content
        return np.asarray(xy, dtype=np.float64) * [w / self.width, h / self.height]

    def mask_to_model(self, mask: np.ndarray, device: torch.device) -> torch.Tensor:
        """A boolean ``[H, W]`` mask -> binary ``[1, 1, S, S]`` float mask."""
        m = torch.as_tensor(np.asarray(mask, dtype=np.float32), device=device)[None, None]
        if tuple(m.shape[-2:]) != self.content:
            m = (self._resize(m) >= 0.5).float()
        return self._pad(m)

    def logits_to_frame(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 1, h, w]`` of the model's square input -> ``[B, H, W]`` at the frame's size."""
        side = logits.shape[-1]
        rows = round(self.content[0] * side / self.image_size)
        cols = round(self.content[1] * side / self.image_size)
        out = F.interpolate(
            logits[..., :rows, :cols].float(),
            size=(self.height, self.width),
            mode="bilinear",
            align_corners=False,
        )
        return out[:, 0]
