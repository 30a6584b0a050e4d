"""The offline default model's image encoder: LiteMedSAM's TinyViT behind SAM 2's image-encoder interface.

SAM 2's Hiera encoder hands the tracker an FPN of several levels; LiteMedSAM's TinyViT gives one
``[B, 256, 64, 64]`` map at 256 px (stride 4), already projected to the decoder width by its own neck. This
wrapper returns that single level in the dict layout of :class:`~medsam2.model.image_encoder.ImageEncoder`,
with SAM 2's sine position encoding, so the tracker needs no special case beyond ``use_high_res_features``
being off.
"""

from __future__ import annotations

import torch
from torch import nn

from .position_encoding import PositionEmbeddingSine
from .tinyvit import TinyViT


class LiteImageEncoder(nn.Module):
    """``images [B, 3, S, S]`` (min-max scaled to [0, 1]) -> dict with one level at ``S / 4``:

    - ``vision_features``: ``[B, d_model, S/4, S/4]``;
    - ``vision_pos_enc``: ``[pos]``, the sine encoding of that map, ``[B, d_model, S/4, S/4]``;
    - ``backbone_fpn``: ``[vision_features]``.

    Parameter names are ``trunk.*`` = LiteMedSAM's ``image_encoder.*`` keys (see ``medsam2.lite``). The
    trunk's batch norms need eval mode: the encoder is always used frozen.
    """

    def __init__(self, d_model: int = 256) -> None:
        super().__init__()
        self.trunk = TinyViT(out_chans=d_model)
        self.position_encoding = PositionEmbeddingSine(d_model)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        features = self.trunk(images)
        pos = self.position_encoding(features).to(features.dtype)
        return {"vision_features": features, "vision_pos_enc": [pos], "backbone_fpn": [features]}
