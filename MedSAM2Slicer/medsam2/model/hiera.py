"""Hiera: the hierarchical vision transformer trunk of the SAM 2 image encoder.

The trunk turns an image into four feature maps at strides 4, 8, 16 and 32. Every stage after the first halves
the resolution by max-pooling the attention queries of its first block, and doubles the width and head count.
Most blocks attend within non-overlapping windows; a few listed blocks attend globally.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Cut a map into square windows, zero-padding its bottom and right edges to whole windows.

    ``[B, H, W, C]`` -> (``[B * nh * nw, window_size, window_size, C]``, ``(nh, nw)``), windows in row-major
    order per image.
    """
    b, h, w, c = x.shape
    nh, nw = math.ceil(h / window_size), math.ceil(w / window_size)
    pad_h, pad_w = nh * window_size - h, nw * window_size - w
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    x = x.view(b, nh, window_size, nw, window_size, c).transpose(2, 3)
    return x.reshape(b * nh * nw, window_size, window_size, c), (nh, nw)


def window_unpartition(windows: torch.Tensor, grid: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: stitch the windows of an ``nh x nw`` grid and crop the padding.

    ``[B * nh * nw, ws, ws, C]`` -> ``[B, H, W, C]``. The window size is read from ``windows`` so that windows
    shrunk by query pooling are stitched on the same grid.
    """
    nh, nw = grid
    _, ws_h, ws_w, c = windows.shape
    x = windows.view(-1, nh, nw, ws_h, ws_w, c).transpose(2, 3).reshape(-1, nh * ws_h, nw * ws_w, c)
    h, w = hw
    if nh * ws_h > h or nw * ws_w > w:
        x = x[:, :h, :w]
    return x


def max_pool_hw(x: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
    """Max-pool the spatial axes of a channels-last map: ``[B, H, W, C]`` -> ``[B, H // sh, W // sw, C]``."""
    return F.max_pool2d(x.permute(0, 3, 1, 2), kernel_size=stride, stride=stride).permute(0, 2, 3, 1)


class PatchEmbed(nn.Module):
    """Overlapping 7x7, stride-4 patch projection: ``[B, 3, S, S]`` -> channels-last ``[B, S/4, S/4, C]``."""

    def __init__(self, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=7, stride=4, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class HieraMLP(nn.Module):
    """Two linear layers with GELU between them (checkpoint keys ``layers.0``, ``layers.1``)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, hidden_dim), nn.Linear(hidden_dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](F.gelu(self.layers[0](x)))


class MultiScaleAttention(nn.Module):
    """Self-attention over a channels-last map whose queries may be max-pooled.

    ``[B, H, W, dim]`` -> ``[B, H', W', dim_out]`` with ``(H', W') = (H, W) // q_stride`` when the queries
    are pooled (the first block of a stage) and ``(H, W)`` otherwise. Keys and values keep the full
    resolution, so a pooled query still sees every token of its window.
    """

    def __init__(
        self, dim: int, dim_out: int, num_heads: int, q_stride: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        if dim_out % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide the width ({dim_out})")
        self.num_heads = num_heads
        self.q_stride = q_stride
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, C]`` -> ``[B, heads, H * W, C / heads]``."""
        b, h, w, c = x.shape
        return x.reshape(b, h * w, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.q_stride is not None:
            q = max_pool_hw(q, self.q_stride)
        b, h, w, c = q.shape
        out = F.scaled_dot_product_attention(self._split_heads(q), self._split_heads(k), self._split_heads(v))
        return self.proj(out.transpose(1, 2).reshape(b, h, w, c))


class MultiScaleBlock(nn.Module):
    """Pre-norm transformer block on a channels-last map, optionally windowed and/or downsampling.

    ``[B, H, W, dim]`` -> ``[B, H', W', dim_out]``. ``window_size`` 0 means global attention. With
    ``q_stride`` the queries and the residual are max-pooled, halving the map; when the width changes the
    residual goes through a linear ``proj`` first.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        window_size: int = 0,
        q_stride: tuple[int, int] | None = None,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.dim_out = dim_out
        self.window_size = window_size
        self.q_stride = q_stride
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, q_stride=q_stride)
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = HieraMLP(dim_out, int(dim_out * mlp_ratio))
        # Only stage transitions change the width; their residual is projected (from the normalized input).
        self.proj = nn.Linear(dim, dim_out) if dim != dim_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.norm1(x)
        shortcut = x if self.proj is None else self.proj(normed)
        if self.q_stride is not None:
            shortcut = max_pool_hw(shortcut, self.q_stride)

        if self.window_size > 0:
            windows, grid = window_partition(normed, self.window_size)
            attended = window_unpartition(self.attn(windows), grid, shortcut.shape[1:3])
        else:
            attended = self.attn(normed)

        x = shortcut + attended
        return x + self.mlp(self.norm2(x))


class Hiera(nn.Module):
    """The Hiera trunk: ``[B, 3, S, S]`` -> four maps ``[B, C_i, S / 2^(i+2), S / 2^(i+2)]``, high-res first.

    ``C_i = embed_dim * dim_mul^i``. Argument names follow the official configs. ``stages`` gives the blocks
    per stage, ``window_spec`` the attention window per stage and ``global_att_blocks`` the indices of blocks
    that attend globally instead. A block's window is that of the stage of the block before it, so the first,
    downsampling block of a stage still uses the previous stage's window. The absolute position embedding is a
    coarse ``pos_embed`` (bicubically resized to the patch grid) plus a ``pos_embed_window`` tiled over it,
    which lets any image size be used.
    """

    def __init__(
        self,
        embed_dim: int = 96,
        num_heads: int = 1,
        q_pool: int = 3,
        q_stride: tuple[int, int] = (2, 2),
        stages: tuple[int, ...] = (2, 3, 16, 3),
        dim_mul: float = 2.0,
        head_mul: float = 2.0,
        window_pos_embed_bkg_spatial_size: tuple[int, int] = (14, 14),
        window_spec: tuple[int, ...] = (8, 4, 14, 7),
        global_att_blocks: tuple[int, ...] = (12, 16, 20),
    ) -> None:
        super().__init__()
        if len(stages) != len(window_spec):
            raise ValueError(f"stages {tuple(stages)} and window_spec {tuple(window_spec)} differ in length")
        if not 0 <= q_pool < len(stages):
            raise ValueError(f"q_pool must be in [0, {len(stages) - 1}], got {q_pool}")
        q_stride = tuple(q_stride)
        stage_ends = [sum(stages[: i + 1]) - 1 for i in range(len(stages))]
        pooled_blocks = {end + 1 for end in stage_ends[:q_pool]}
        global_blocks = set(global_att_blocks)
        self.stage_ends = stage_ends

        self.patch_embed = PatchEmbed(embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *window_pos_embed_bkg_spatial_size))
        self.pos_embed_window = nn.Parameter(torch.zeros(1, embed_dim, window_spec[0], window_spec[0]))

        self.blocks = nn.ModuleList()
        dim, stage = embed_dim, 0
        for i in range(stage_ends[-1] + 1):
            window_size = 0 if i in global_blocks else window_spec[stage]
            if i in pooled_blocks and any(window_size % s for s in q_stride):
                raise ValueError(
                    f"block {i} pools its queries by {q_stride}, which must divide its window {window_size}"
                )
            dim_out = dim
            if i - 1 in stage_ends:
                stage += 1
                dim_out = int(dim * dim_mul)
                num_heads = int(num_heads * head_mul)
            self.blocks.append(
                MultiScaleBlock(
                    dim,
                    dim_out,
                    num_heads,
                    window_size=window_size,
                    q_stride=q_stride if i in pooled_blocks else None,
                )
            )
            dim = dim_out
        # Widths of the stage outputs, lowest resolution first (the order the neck's convs are listed in).
        self.channel_list = [self.blocks[end].dim_out for end in reversed(stage_ends)]

    def _position_embedding(self, hw: tuple[int, int]) -> torch.Tensor:
        """``[1, H, W, C]`` position embedding of an H x W patch grid."""
        h, w = hw
        pos = F.interpolate(self.pos_embed, size=(h, w), mode="bicubic")
        window = self.pos_embed_window
        reps = (math.ceil(h / window.shape[-2]), math.ceil(w / window.shape[-1]))
        pos = pos + window.tile(1, 1, *reps)[:, :, :h, :w]
        return pos.permute(0, 2, 3, 1)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``images [B, 3, S, S]`` -> stage outputs ``[B, C_i, H_i, W_i]``, highest resolution first."""
        x = self.patch_embed(images)
        x = x + self._position_embedding(x.shape[1:3])
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.stage_ends:
                outputs.append(x.permute(0, 3, 1, 2))
        return outputs
