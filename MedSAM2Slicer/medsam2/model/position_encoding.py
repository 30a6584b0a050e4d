"""Fixed sine/cosine position encodings for feature maps."""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """2D sine position encoding of a feature map (the transformer encoding applied to row and column).

    ``[B, C, H, W]`` -> ``[B, num_pos_feats, H, W]``: the first half of the channels encodes the row, the
    second half the column, each as interleaved sin/cos pairs of geometrically spaced frequencies. With
    ``normalize`` the positions 1..H and 1..W are rescaled to (0, ``scale``], so the encoding depends on the
    relative position only, not on the map size. The module has no parameters; the maps are computed in
    float32, cached per size, device and dtype, and returned as a broadcast view of the cache (callers must
    not modify them in place).
    """

    def __init__(
        self,
        num_pos_feats: int,
        temperature: int = 10000,
        normalize: bool = True,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(
                f"num_pos_feats must be even (half for rows, half for columns), got {num_pos_feats}"
            )
        if scale is not None and not normalize:
            raise ValueError("scale only applies to normalized positions; pass normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self._cache: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}

    def _axis_encoding(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions ``[N]`` (float32) -> ``[N, num_pos_feats / 2]`` sin/cos features."""
        half = self.num_pos_feats // 2
        # Each sin/cos pair shares one frequency.
        pair_index = torch.arange(half, dtype=torch.float32, device=positions.device) // 2
        frequencies = self.temperature ** (2 * pair_index / half)
        angles = positions[:, None] / frequencies
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)

    @torch.no_grad()
    def _encoding(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """``[num_pos_feats, H, W]`` float32 encoding of an H x W grid."""
        rows = torch.arange(1, height + 1, dtype=torch.float32, device=device)
        cols = torch.arange(1, width + 1, dtype=torch.float32, device=device)
        if self.normalize:
            eps = 1e-6
            rows = rows / (rows[-1:] + eps) * self.scale
            cols = cols / (cols[-1:] + eps) * self.scale
        row_enc = self._axis_encoding(rows)  # [H, F/2]
        col_enc = self._axis_encoding(cols)  # [W, F/2]
        half = self.num_pos_feats // 2
        return torch.cat(
            (
                row_enc.t()[:, :, None].expand(half, height, width),
                col_enc.t()[:, None, :].expand(half, height, width),
            ),
            dim=0,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, H, W]`` -> ``[B, num_pos_feats, H, W]``; only x's shape, device and dtype matter."""
        batch, _, height, width = x.shape
        key = (height, width, x.device, x.dtype)
        pos = self._cache.get(key)
        if pos is None:
            # A cache filled under inference mode must still be usable later in autograd (training) code.
            with torch.inference_mode(False):
                pos = self._encoding(height, width, x.device).to(x.dtype)
            self._cache[key] = pos
        return pos[None].expand(batch, -1, -1, -1)
