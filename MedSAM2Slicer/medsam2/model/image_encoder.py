"""The SAM 2 image encoder: a multi-scale trunk followed by an FPN neck."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .position_encoding import PositionEmbeddingSine


class FpnNeck(nn.Module):
    """Feature-pyramid neck: projects every trunk level to ``d_model`` channels and adds top-down features.

    Input: the trunk levels ``[B, C_i, H_i, W_i]``, highest resolution first. ``backbone_channel_list`` lists
    their widths lowest resolution first (``convs.0`` takes the lowest-resolution level). Only the levels in
    ``fpn_top_down_levels`` (indices into the high-res-first list) receive the upsampled output of the level
    below them; the others are the lateral projection alone. Returns ``(features, pos)``, two lists of
    ``[B, d_model, H_i, W_i]`` maps, highest resolution first; ``pos`` is the sine encoding of each map.
    """

    def __init__(
        self,
        d_model: int,
        backbone_channel_list: list[int],
        fpn_top_down_levels: list[int] | None = None,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        fpn_interp_model: str = "nearest",
        position_encoding: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if fpn_interp_model not in ("nearest", "bilinear"):
            raise ValueError(f"fpn_interp_model must be 'nearest' or 'bilinear', got {fpn_interp_model!r}")
        self.d_model = d_model
        self.backbone_channel_list = list(backbone_channel_list)
        self.convs = nn.ModuleList()
        for channels in self.backbone_channel_list:
            # The extra Sequential level keeps the checkpoint key `convs.{i}.conv.*`.
            lateral = nn.Sequential()
            lateral.add_module("conv", nn.Conv2d(channels, d_model, kernel_size, stride, padding))
            self.convs.append(lateral)
        num_levels = len(self.convs)
        self.fpn_top_down_levels = (
            set(range(num_levels)) if fpn_top_down_levels is None else set(fpn_top_down_levels)
        )
        self.fpn_interp_model = fpn_interp_model
        self.position_encoding = (
            PositionEmbeddingSine(d_model) if position_encoding is None else position_encoding
        )

    def forward(self, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if len(xs) != len(self.convs):
            raise ValueError(f"expected {len(self.convs)} trunk levels, got {len(xs)}")
        last = len(xs) - 1
        features: list[torch.Tensor] = [None] * len(xs)  # type: ignore[list-item]
        coarser = None
        # Walk from the lowest resolution up so each level can take the one below it.
        for level in range(last, -1, -1):
            x = self.convs[last - level](xs[level])
            if coarser is not None and level in self.fpn_top_down_levels:
                x = x + self._upsample(coarser, x.shape[-2:])
            features[level] = coarser = x
        pos = [self.position_encoding(x) for x in features]
        return features, pos

    def _upsample(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        if self.fpn_interp_model == "nearest":
            return F.interpolate(x, size=size, mode="nearest")
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ImageEncoder(nn.Module):
    """Trunk + neck. ``images [B, 3, S, S]`` -> dict with

    - ``vision_features``: ``[B, d_model, H, W]``, the lowest-resolution level kept (S/16 with ``scalp=1``);
    - ``vision_pos_enc``: position encodings of the kept levels, highest resolution first;
    - ``backbone_fpn``: the kept neck levels, highest resolution first.

    ``scalp`` drops that many of the lowest-resolution levels (SAM 2 drops the stride-32 level).
    """

    def __init__(self, trunk: nn.Module, neck: FpnNeck, scalp: int = 0) -> None:
        super().__init__()
        if list(trunk.channel_list) != list(neck.backbone_channel_list):
            raise ValueError(
                f"trunk widths {list(trunk.channel_list)} do not match the neck's "
                f"backbone_channel_list {list(neck.backbone_channel_list)}"
            )
        if not 0 <= scalp < len(neck.backbone_channel_list):
            raise ValueError(f"scalp must leave at least one level, got {scalp}")
        self.trunk = trunk
        self.neck = neck
        self.scalp = scalp

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        features, pos = self.neck(self.trunk(images))
        kept = len(features) - self.scalp
        features, pos = features[:kept], pos[:kept]
        return {"vision_features": features[-1], "vision_pos_enc": pos, "backbone_fpn": features}
