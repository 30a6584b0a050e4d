"""TinyViT image encoder in LiteMedSAM's layout: a 256x256 image -> a ``[B, 256, 64, 64]`` embedding.

LiteMedSAM (the offline default's image encoder) is a TinyViT whose patch embedding is pointwise: unlike the
classification TinyViT it does not shrink the image there, so a 256x256 input reaches the 64x64 grid of SAM's
prompt encoder and mask decoder through two stride-2 patch mergings. The stages are

    patch embedding  [B, 3, H, W]       -> [B, 64, H, W]        two pointwise conv + batch norm
    stage 0 (conv)   [B, 64, H, W]      -> [B, 128, H/2, W/2]   MBConv blocks, then a stride-2 merging
    stage 1 (attn)   [B, 128, H/2, W/2] -> [B, 160, H/4, W/4]   window attention blocks, stride-2 merging
    stage 2 (attn)   [B, 160, H/4, W/4] -> [B, 320, H/4, W/4]   window attention blocks, stride-1 merging
    stage 3 (attn)   [B, 320, H/4, W/4] -> [B, 320, H/4, W/4]   window attention blocks
    neck             [B, 320, H/4, W/4] -> [B, 256, H/4, W/4]   1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d

Parameter and buffer names equal LiteMedSAM's ``image_encoder.*`` keys without the prefix, so its weights load
strictly. Batch norms use their running statistics only in eval mode: keep the encoder in eval mode (frozen)
unless you mean to retrain it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d

# Rows per band when the convolutional stage runs at inference. Its blocks expand 64 channels to 256 at the
# full input resolution (64 MB of activations per 256 x 256 image); a band of 16 rows stays in the CPU's cache
# (measured on a 2-core CPU: the stage 3.9x faster, the whole encoder 1.6x). Bands overlap by the 3 x 3
# convolutions' reach, so the result is the whole image's.
_BAND_ROWS = 16


class ConvBN(nn.Module):
    """A bias-free convolution followed by batch norm (keys ``c.*``, ``bn.*``).

    ``[B, in_chans, H, W]`` -> ``[B, out_chans, H / stride, W / stride]``; padding keeps odd kernels centred.
    """

    def __init__(
        self, in_chans: int, out_chans: int, kernel_size: int = 1, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__()
        self.c = nn.Conv2d(
            in_chans, out_chans, kernel_size, stride, padding=kernel_size // 2, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.bn(self.c(x))
        # In eval mode the batch norm is a per-channel affine map: folded into the convolution's weights it
        # costs no pass over the activations, which are large at the pointwise stem's full resolution.
        bn = self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        weight = self.c.weight * scale.view(-1, 1, 1, 1)
        bias = bn.bias - bn.running_mean * scale
        return F.conv2d(x, weight, bias, self.c.stride, self.c.padding, self.c.dilation, self.c.groups)


class PatchEmbed(nn.Module):
    """Pointwise stem: ``[B, in_chans, H, W]`` -> ``[B, embed_dim, H, W]`` (keys ``seq.{0,2}.*``)."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            ConvBN(in_chans, embed_dim // 2),
            nn.GELU(),
            ConvBN(embed_dim // 2, embed_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block: expand 1x1, depthwise 3x3, project 1x1, add the input, GELU.

    ``[B, C, H, W]`` -> ``[B, C, H, W]``.
    """

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, kernel_size=3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self._block(x)
        return _in_row_bands(self._block, x, stride=1)

    def _block(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv1(x))
        y = F.gelu(self.conv2(y))
        return F.gelu(x + self.conv3(y))


class PatchMerging(nn.Module):
    """Channel change and optional downsampling between stages.

    ``[B, dim, H, W]`` -> ``[B, out_dim, H / stride, W / stride]`` through a 1x1 conv, a strided depthwise 3x3
    conv and a 1x1 conv.
    """

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, kernel_size=3, stride=stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self._merge(x)
        return _in_row_bands(self._merge, x, stride=self.conv2.c.stride[0])

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        return self.conv3(x)


def _in_row_bands(fn, x: torch.Tensor, stride: int) -> torch.Tensor:
    """``fn(x)`` for ``x`` ``[B, C, H, W]``, computed ``_BAND_ROWS`` input rows at a time.

    ``fn`` is pointwise except for one 3 x 3 convolution (padding 1, row stride ``stride``): each band is read
    with ``stride`` rows of context above and one below (a context of ``stride`` rows keeps a strided band
    aligned with the whole image's output rows), and only the band's own output rows are kept.
    """
    height = x.shape[2]
    if height <= 2 * _BAND_ROWS:
        return fn(x)
    out = []
    for top in range(0, height, _BAND_ROWS):
        bottom = min(top + _BAND_ROWS, height)
        first = max(top - stride, 0)
        y = fn(x[:, :, first : min(bottom + 1, height)])
        skip = (top - first) // stride
        out.append(y[:, :, skip : skip + -(-(bottom - top) // stride)])
    return torch.cat(out, dim=2)


def relative_offset_index(window_size: int) -> torch.Tensor:
    """``[L, L]`` index (``L = window_size**2``) into a per-head table of learned attention biases.

    Two positions of a window share a bias when their absolute row and column offsets are equal; offset
    ``(|dy|, |dx|)`` owns entry ``|dy| * window_size + |dx|`` of the table (the order in which TinyViT
    enumerates offsets, so the published tables are read correctly).
    """
    coords = torch.arange(window_size)
    rows = coords.repeat_interleave(window_size)
    cols = coords.repeat(window_size)
    dy = (rows[:, None] - rows[None, :]).abs()
    dx = (cols[:, None] - cols[None, :]).abs()
    return dy * window_size + dx


class WindowAttention(nn.Module):
    """Multi-head self-attention inside one window, with learned relative-offset biases.

    Input ``[N, L, C]`` (N windows of ``L = window_size**2`` tokens) -> ``[N, L, C]``. The input is
    layer-normed first. The qkv projection lays its output out head by head (``[q | k | v]`` for head 0,
    then head 1, ...).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide the width ({dim})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        self.register_buffer("bias_index", relative_offset_index(window_size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        qkv = self.qkv(self.norm(x)).view(n, length, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [N, heads, L, head_dim]
        bias = self.attention_biases[:, self.bias_index]  # [heads, L, L]
        # Written out rather than F.scaled_dot_product_attention: with an additive bias and these short
        # windows, the fused CPU kernel is about a third slower.
        weights = ((q @ k.transpose(-2, -1)) * self.head_dim**-0.5 + bias).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(n, length, dim))


class FeedForward(nn.Module):
    """Pre-norm MLP: LayerNorm, linear, GELU, linear. ``[..., dim]`` -> ``[..., dim]``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Window attention (residual), a depthwise 3x3 conv, then an MLP (residual).

    ``[B, H, W, C]`` -> ``[B, H, W, C]``. H and W need not be multiples of the window: the map is zero-padded
    at the bottom and right before attention, and the padded tokens take part as keys, as in TinyViT.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: float) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.local_conv = ConvBN(dim, dim, kernel_size=3, groups=dim)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))

    def _attend_in_windows(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        s = self.window_size
        pad_h, pad_w = -h % s, -w % s
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        rows, cols = (h + pad_h) // s, (w + pad_w) // s
        windows = x.view(b, rows, s, cols, s, c).transpose(2, 3).reshape(b * rows * cols, s * s, c)
        out = self.attn(windows)
        out = out.view(b, rows, cols, s, s, c).transpose(2, 3).reshape(b, rows * s, cols * s, c)
        return out[:, :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._attend_in_windows(x)
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)


class ConvStage(nn.Module):
    """MBConv blocks then a patch merging: ``[B, dim, H, W]`` -> ``[B, out_dim, H / s, W / s]``."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, merging: PatchMerging) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = merging

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


class AttentionStage(nn.Module):
    """TinyViT blocks then, except in the last stage, a patch merging.

    ``[B, dim, H, W]`` -> ``[B, out_dim, H / s, W / s]`` (``[B, dim, H, W]`` without merging).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        merging: PatchMerging | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, num_heads, window_size, mlp_ratio) for _ in range(depth)
        )
        self.downsample = merging

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        for block in self.blocks:
            x = block(x)
        x = x.permute(0, 3, 1, 2)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    """LiteMedSAM's image encoder: ``[B, 3, H, W]`` -> ``[B, out_chans, H / 4, W / 4]`` (with four stages).

    The defaults are LiteMedSAM's (trained on 256x256 inputs in [0, 1], giving a 64x64 embedding). Every
    per-stage sequence has one entry per stage; stage 0 is convolutional, so its ``num_heads`` and
    ``window_sizes`` entries are not used (they are kept so the published configuration reads as published).
    Stages 0 and 1 halve the resolution when merging; the merging into the last stage keeps it.
    """

    def __init__(
        self,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        num_stages = len(depths)
        if num_stages < 2 or any(len(s) != num_stages for s in (embed_dims, num_heads, window_sizes)):
            raise ValueError(
                "embed_dims, depths, num_heads and window_sizes need one entry per stage, with at least two"
            )
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])

        def merging(i: int) -> PatchMerging | None:
            if i == num_stages - 1:
                return None
            stride = 1 if i + 1 == num_stages - 1 else 2
            return PatchMerging(embed_dims[i], embed_dims[i + 1], stride)

        stages: list[nn.Module] = [ConvStage(embed_dims[0], depths[0], mbconv_expand_ratio, merging(0))]
        stages += [
            AttentionStage(embed_dims[i], depths[i], num_heads[i], window_sizes[i], mlp_ratio, merging(i))
            for i in range(1, num_stages)
        ]
        self.layers = nn.ModuleList(stages)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W]`` -> ``[B, out_chans, H / 4, W / 4]``."""
        x = self.patch_embed(image)
        for stage in self.layers:
            x = stage(x)
        return self.neck(x)
