"""Whether a tracked object is still on the frame, judged against what the memory holds of it.

The mask decoder's object-score head sees one frame: the box it was given and the embedding around it. A
box-tracking model past an object's end still finds *something* in the box (the liver under the lung base,
the next vertebra), at a high score. What tells the object apart is what it looked like where the user
prompted it. :class:`PresenceHead` compares the region the decoder predicts with the object's regions on the
prompted frames and on the previous frame, and turns the comparison into a presence logit: a logistic model
over a few cues, fitted on tracking runs that go past the ends of real labelled structures
(``medsam2.train.presence``).

A region is described by :func:`region_descriptor`: the frame's image embedding (the encoder's, before any
memory) averaged over the predicted mask, as a unit vector. It is stored with each frame's result, so the
prompted frames' descriptors are part of the object's memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CUE_NAMES = ("similarity_to_prompts", "similarity_to_previous", "predicted_iou", "log_area_ratio")


def region_descriptor(embedding: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Embedding ``[B, C, h, w]`` averaged over each mask (``logits`` ``[B, 1, H, W]`` > 0, any size) -> unit
    vectors ``[B, C]``; an empty mask gives a zero vector."""
    weights = F.adaptive_avg_pool2d((logits > 0).to(embedding.dtype), embedding.shape[-2:])  # [B, 1, h, w]
    pooled = (embedding * weights).sum(dim=(-2, -1)) / weights.sum(dim=(-2, -1)).clamp_min(1e-6)
    return F.normalize(pooled.float(), dim=1)


def mask_area(logits: torch.Tensor) -> torch.Tensor:
    """Pixels of each mask ``[B, 1, H, W]`` (logits > 0) as ``[B]`` floats."""
    return (logits > 0).flatten(1).sum(dim=1).float()


class PresenceHead(nn.Module):
    """A presence logit ``[B, 1]`` from the cues of :data:`CUE_NAMES` (see :meth:`cues`).

    ``weight`` ``[K]`` and ``bias`` ``[1]`` are fitted; a fresh head has zero weights and a large bias, so it
    calls every object present and leaves the decoder's own decision alone.
    """

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(len(CUE_NAMES)))
        self.bias = nn.Parameter(torch.full((1,), 10.0))

    @staticmethod
    def cues(
        descriptor: torch.Tensor,
        prompted: list[torch.Tensor],
        previous: torch.Tensor | None,
        iou: torch.Tensor,
        area: torch.Tensor,
        previous_area: torch.Tensor | None,
    ) -> torch.Tensor:
        """The cues ``[B, K]`` of a frame's predicted region.

        ``descriptor`` ``[B, C]``: the region's (:func:`region_descriptor`); ``prompted``: the object's
        descriptors on its prompted frames (each ``[B, C]``, the most similar counts); ``previous``: on the
        frame tracked just before (``None``: the prompted frames stand in); ``iou``: predicted IoU ``[B]``;
        ``area`` / ``previous_area``: mask pixels ``[B]`` on this frame and the previous one.
        """
        to_prompts = torch.stack([(descriptor * p.to(descriptor)).sum(dim=1) for p in prompted]).amax(dim=0)
        to_previous = to_prompts if previous is None else (descriptor * previous.to(descriptor)).sum(dim=1)
        ratio = (
            torch.zeros_like(area) if previous_area is None else torch.log((area + 1) / (previous_area + 1))
        )
        return torch.stack([to_prompts, to_previous, iou.float(), ratio], dim=1)

    def forward(self, cues: torch.Tensor) -> torch.Tensor:
        return (cues @ self.weight.to(cues) + self.bias.to(cues)).unsqueeze(1)
