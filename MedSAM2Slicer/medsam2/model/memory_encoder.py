"""Memory encoder: turns a frame's image features and its predicted mask into a memory for later frames.

The mask is downsampled to the feature grid by strided convolutions, added to the projected image features, mixed
by a few ConvNeXt blocks and projected to the (narrower) memory width.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .common import LayerNorm2d
from .position_encoding import PositionEmbeddingSine


class MaskDownSampler(nn.Module):
    """Strided conv stages (conv, LayerNorm2d, GELU), each dividing the size by ``stride`` and multiplying the
    channels by ``stride ** 2``, until ``total_stride``; then a 1x1 conv to ``embed_dim``.

    ``[B, 1, H, W]`` -> ``[B, embed_dim, H / total_stride, W / total_stride]``.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        kernel_size: int = 3,
        stride: int = 2,
        padding: int = 1,
        total_stride: int = 16,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, reached = 1, 1
        while reached < total_stride:
            out_channels = channels * stride**2
            layers += [
                nn.Conv2d(channels, out_channels, kernel_size, stride=stride, padding=padding),
                LayerNorm2d(out_channels),
                nn.GELU(),
            ]
            channels, reached = out_channels, reached * stride
        if reached != total_stride:
            raise ValueError(f"total_stride {total_stride} is not a power of stride {stride}")
        layers.append(nn.Conv2d(channels, embed_dim, kernel_size=1))
        self.encoder = nn.Sequential(*layers)

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        return self.encoder(masks)


class CXBlock(nn.Module):
    """ConvNeXt block: depthwise conv, LayerNorm, pointwise MLP (4x wider, GELU), scaled by ``gamma``, residual.

    ``[B, dim, H, W]`` -> same shape. The norm and MLP run channels-last, where they are plain per-token layers.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        padding: int = 3,
        layer_scale_init_value: float = 1e-6,
    ) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=padding, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        # Layer scale: a block starts close to the identity so that stacking them trains stably.
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class Fuser(nn.Module):
    """``num_layers`` copies of ``layer`` applied in turn; ``[B, C, H, W]`` -> same shape."""

    def __init__(self, layer: nn.Module, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class MemoryEncoder(nn.Module):
    """Image features + mask logits -> memory features and their sine position encoding.

    ``pix_feat [B, in_dim, h, w]`` and ``masks [B, 1, total_stride * h, total_stride * w]`` ->
    ``{"vision_features": [B, out_dim, h, w], "vision_pos_enc": [[B, out_dim, h, w]]}``.
    """

    def __init__(
        self,
        out_dim: int,
        mask_downsampler: MaskDownSampler,
        fuser: Fuser,
        position_encoding: PositionEmbeddingSine,
        in_dim: int = 256,
    ) -> None:
        super().__init__()
        self.mask_downsampler = mask_downsampler
        self.pix_feat_proj = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.fuser = fuser
        self.position_encoding = position_encoding
        self.out_proj = nn.Conv2d(in_dim, out_dim, kernel_size=1) if out_dim != in_dim else nn.Identity()

    def forward(
        self, pix_feat: torch.Tensor, masks: torch.Tensor, skip_mask_sigmoid: bool = False
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """``skip_mask_sigmoid``: ``masks`` are already probabilities (or binary), not logits."""
        if not skip_mask_sigmoid:
            # Probabilities look like the binary ground-truth masks seen in training.
            masks = torch.sigmoid(masks)
        # The image features may have been kept on another device (offloaded) than the masks. Channels-last,
        # the ConvNeXt blocks' norm and MLP read their tokens in place instead of from a transposed copy.
        pix_feat = pix_feat.to(masks.device, memory_format=torch.channels_last)
        x = self.pix_feat_proj(pix_feat) + self.mask_downsampler(masks)
        x = self.out_proj(self.fuser(x))
        return {"vision_features": x, "vision_pos_enc": [self.position_encoding(x)]}
