"""SAM's prompt encoder: points and box corners become sparse tokens, a mask becomes a dense map.

Coordinates are pixels of the model input (``0..image_size``, x first). Point labels: 1 positive click,
0 negative click, 2 / 3 top-left / bottom-right box corner, -1 padding (no point).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from medsam2.errors import InputError
from medsam2.model.common import LayerNorm2d

PADDING_LABEL = -1
BOX_CORNER_LABELS = (2, 3)


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class PositionEmbeddingRandom(nn.Module):
    """Fourier features of 2-D positions with a fixed random Gaussian frequency matrix.

    A position ``p`` in ``[0, 1]^2`` is encoded as ``[sin(2 pi (2p - 1) G), cos(2 pi (2p - 1) G)]`` with
    ``G`` the ``[2, num_pos_feats]`` buffer, giving ``2 * num_pos_feats`` channels.
    """

    def __init__(self, num_pos_feats: int = 64) -> None:
        super().__init__()
        # Random at construction, then always overwritten by the checkpoint (it is a persistent buffer).
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_pos_feats))

    def _encode(self, unit_coords: torch.Tensor) -> torch.Tensor:
        """``[..., 2]`` positions in ``[0, 1]`` (x, y) -> ``[..., 2 * num_pos_feats]``."""
        angles = (2 * unit_coords - 1) @ self.positional_encoding_gaussian_matrix
        angles = 2 * math.pi * angles
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of the centres of an ``(h, w)`` grid -> ``[2 * num_pos_feats, h, w]``."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        # Cell centres written as a running sum of ones minus a half, which is bit-identical to SAM's grid.
        ones = torch.ones((h, w), device=device, dtype=torch.float32)
        y = (ones.cumsum(dim=0) - 0.5) / h
        x = (ones.cumsum(dim=1) - 0.5) / w
        return self._encode(torch.stack([x, y], dim=-1)).permute(2, 0, 1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """``[B, N, 2]`` pixel coordinates (x, y) in an image of ``image_size = (H, W)`` -> ``[B, N, C]``."""
        height, width = image_size
        unit = torch.stack([coords[..., 0] / width, coords[..., 1] / height], dim=-1)
        return self._encode(unit.to(torch.float))


class PromptEncoder(nn.Module):
    """Embeds points / boxes into sparse tokens and an optional low-res mask into a dense map.

    ``image_embedding_size`` is the ``(h, w)`` of the image encoder's stride-16 map and ``input_image_size``
    the ``(H, W)`` of the model input; a mask prompt must be ``[B, 1, 4h, 4w]`` (the decoder's low-res size).
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: int | tuple[int, int],
        input_image_size: int | tuple[int, int],
        mask_in_chans: int,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = _pair(image_embedding_size)
        self.input_image_size = _pair(input_image_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)

        # One learned type embedding per label: 0 negative, 1 positive, 2 / 3 box corners.
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)

        h, w = self.image_embedding_size
        self.mask_input_size = (4 * h, 4 * w)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of every cell of the image embedding -> ``[1, C, h, w]``."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """``[B, N, 2]`` pixel coords + ``[B, N]`` labels -> ``[B, N (+1 if pad), C]``."""
        coords = coords + 0.5  # a pixel index refers to the pixel's centre
        labels = labels.long()
        if pad:
            # Without a box, SAM was trained with one extra "no point" token after the clicks.
            coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), PADDING_LABEL)], dim=1)
        position = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        is_padding = (labels == PADDING_LABEL).unsqueeze(-1)
        embedding = torch.where(is_padding, self.not_a_point_embed.weight.expand_as(position), position)
        for label, type_embedding in enumerate(self.point_embeddings):
            embedding = embedding + (labels == label).unsqueeze(-1) * type_embedding.weight
        return embedding

    def _check_mask(self, masks: torch.Tensor) -> None:
        if masks.ndim != 4 or masks.shape[1] != 1 or tuple(masks.shape[-2:]) != self.mask_input_size:
            raise InputError(
                f"mask prompt must be [B, 1, {self.mask_input_size[0]}, {self.mask_input_size[1]}], "
                f"got {list(masks.shape)}"
            )

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed the prompts of a batch.

        Args:
            points: ``(coords [B, N, 2], labels [B, N])`` in input pixels, or None.
            boxes: ``[B, 4]`` as ``x0, y0, x1, y1`` in input pixels, or None; embedded exactly like two points
                labelled 2 and 3 placed after ``points``.
            masks: ``[B, 1, 4h, 4w]`` mask logits, or None.

        Returns:
            sparse ``[B, N', C]`` and dense ``[B, C, h, w]``; ``N' = N + 1`` with points but no box (a padding
            token is appended), ``N + 2`` with a box, 0 with neither.
        """
        if points is not None:
            batch = points[0].shape[0]
        elif boxes is not None:
            batch = boxes.shape[0]
        elif masks is not None:
            batch = masks.shape[0]
        else:
            batch = 1
        weight = self.no_mask_embed.weight

        sparse = [weight.new_empty(batch, 0, self.embed_dim)]
        if points is not None:
            coords, labels = points
            sparse.append(self._embed_points(coords, labels, pad=boxes is None))
        if boxes is not None:
            corners = boxes.reshape(-1, 2, 2)
            corner_labels = torch.tensor(BOX_CORNER_LABELS, device=boxes.device).expand(corners.shape[0], 2)
            sparse.append(self._embed_points(corners, corner_labels, pad=False))
        sparse_embeddings = torch.cat(sparse, dim=1)

        if masks is not None:
            self._check_mask(masks)
            dense_embeddings = self.mask_downscaling(masks)
        else:
            h, w = self.image_embedding_size
            dense_embeddings = weight.reshape(1, -1, 1, 1).expand(batch, -1, h, w)
        return sparse_embeddings, dense_embeddings
