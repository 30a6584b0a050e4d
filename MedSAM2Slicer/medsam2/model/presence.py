"""Whether a tracked object is still on the frame, judged against what the memory holds of it.

The mask decoder's object-score head sees one frame: the box it was given and the embedding around it. A
box-tracking model past an object's end still finds *something* in the box (the liver under the lung base,
the next vertebra), at a high score. What tells the object apart is what it looked like where the user
prompted it. :class:`PresenceHead` compares the region the decoder predicts with the object's regions on the
prompted frames and on the previous frame, and turns the comparison into a presence logit: a logistic model
over a few cues, fitted on tracking runs that go past the ends of real labelled structures
(``medsam2.train.presence``).

A :class:`Region` holds the frame's image embedding (the encoder's, before any memory) averaged over the
predicted mask, as a unit vector, and the mean and spread of the input image's intensity under it (CT windows
and MR percentiles make intensities comparable from slice to slice). It is stored with each frame's result,
so the prompted frames' regions are part of the object's memory.

The same intensities, as a median and a robust spread, say which pixels of a tracked mask the object can
hold at all (:func:`typical_cells`): a lung's tracked mask that slides onto the liver below the diaphragm keeps
the box of the liver, and no per-slice presence judgement can tell that slice from the lung's last ones
(BENCHMARKS 4d). Dropping the cells whose intensity the prompted object never had shrinks the mask, and the
chained box with it, to what is still the object.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

CUE_NAMES = (
    "similarity_to_prompts",
    "similarity_to_previous",
    "predicted_iou",
    "log_area_ratio",
    "intensity_change_from_prompts",
    "intensity_change_from_previous",
)
# Intensity changes are in units of the earlier region's spread plus this (inputs are in [0, 1]).
_INTENSITY_SPREAD_FLOOR = 0.05
# The median absolute deviation times this estimates a normal spread (standard deviation).
_MAD_TO_SD = 1.4826
# The least spread of the typical band (inputs in [0, 1]): a heart in a mediastinum window is mostly
# contrast-filled blood clipped at 1, so its MAD is 0, yet its muscle belongs to it.
_TYPICAL_SPREAD_FLOOR = 0.1


def region_descriptor(embedding: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Embedding ``[B, C, h, w]`` averaged over each mask (``logits`` ``[B, 1, H, W]`` > 0, any size) -> unit
    vectors ``[B, C]``; an empty mask gives a zero vector."""
    weights = _mask_weights(logits, embedding)
    pooled = (embedding * weights).sum(dim=(-2, -1)) / weights.sum(dim=(-2, -1)).clamp_min(1e-6)
    return F.normalize(pooled.float(), dim=1)


def _mask_weights(logits: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The share of each cell of ``like``'s grid that the mask covers: ``[B, 1, h, w]``."""
    return F.adaptive_avg_pool2d((logits > 0).to(like.dtype), like.shape[-2:])


def mask_area(logits: torch.Tensor) -> torch.Tensor:
    """Pixels of each mask ``[B, 1, H, W]`` (logits > 0) as ``[B]`` floats."""
    return (logits > 0).flatten(1).sum(dim=1).float()


@dataclass
class Region:
    """What a mask covers on its frame: ``descriptor`` ``[B, C]`` (:func:`region_descriptor`);
    ``intensity`` ``[B, 2]``, the mean and standard deviation of the input image under it; ``typical``
    ``[B, 2]``, the median and the median absolute deviation of the image's cells (embedding grid) the mask
    covers at least half of. Intensities are zeros when the features carry none; ``typical`` is NaN for an
    empty mask."""

    descriptor: torch.Tensor
    intensity: torch.Tensor
    typical: torch.Tensor

    @classmethod
    def of(cls, features, logits: torch.Tensor) -> Region:
        """The region of mask ``logits`` ``[B, 1, H, W]`` on a frame's :class:`~medsam2.model.sam2.ImageFeatures`."""
        descriptor = region_descriptor(features.embedding, logits)
        if features.intensity is None:
            zeros = descriptor.new_zeros(len(descriptor), 2)
            return cls(descriptor, zeros, zeros)
        image = features.intensity.float()
        weights = _mask_weights(logits, image)
        total = weights.sum(dim=(-2, -1)).clamp_min(1e-6)  # [B, 1]
        mean = (image * weights).sum(dim=(-2, -1)) / total
        variance = ((image - mean[..., None, None]) ** 2 * weights).sum(dim=(-2, -1)) / total
        return cls(descriptor, torch.cat([mean, variance.sqrt()], dim=1), _typical(image, weights >= 0.5))

    def emptied(self, rows: torch.Tensor) -> Region:
        """This region with the objects where ``rows`` ``[B]`` is True set to an empty mask's."""
        return Region(
            self.descriptor.masked_fill(rows[:, None], 0.0),
            self.intensity.masked_fill(rows[:, None], 0.0),
            self.typical.masked_fill(rows[:, None], float("nan")),
        )


def _typical(image: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
    """Median and median absolute deviation ``[B, 2]`` of ``image`` ``[B, 1, h, w]`` over the ``covered``
    cells (NaN where none is)."""
    out = image.new_full((len(covered), 2), float("nan"))
    for b, (values, inside) in enumerate(zip(image.expand_as(covered), covered)):
        cells = values[inside]
        if cells.numel():
            median = cells.median()
            out[b] = torch.stack([median, (cells - median).abs().median()])
    return out


def typical_cells(intensity: torch.Tensor, prompted: list[Region], spreads: float) -> torch.Tensor:
    """``[B, 1, h, w]`` True for the cells of a frame's ``intensity`` ``[B, 1, h, w]`` that lie within
    ``spreads`` robust standard deviations (at least ``_TYPICAL_SPREAD_FLOOR``) of the median of some
    prompted region of the object; every cell where no prompted region has a mask."""
    typical = torch.zeros_like(intensity, dtype=torch.bool)
    for region in prompted:
        median, mad = region.typical.to(intensity).unbind(dim=1)  # [B], [B]
        half_width = spreads * torch.clamp_min(_MAD_TO_SD * mad, _TYPICAL_SPREAD_FLOOR)
        within = (intensity - median[:, None, None, None]).abs() <= half_width[:, None, None, None]
        typical |= within | median.isnan()[:, None, None, None]
    return typical


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
        region: Region,
        prompted: list[Region],
        previous: Region | None,
        iou: torch.Tensor,
        area: torch.Tensor,
        previous_area: torch.Tensor | None,
    ) -> torch.Tensor:
        """The cues ``[B, K]`` of a frame's predicted ``region``, in the order of :data:`CUE_NAMES`.

        ``prompted``: the object's regions on its prompted frames (the most alike counts); ``previous``: on
        the frame tracked just before (``None``: the prompted frames stand in); ``iou``: predicted IoU ``[B]``;
        ``area`` / ``previous_area``: mask pixels ``[B]`` on this frame and the previous one.
        """
        prompts = torch.stack(
            [(region.descriptor * p.descriptor.to(region.descriptor)).sum(dim=1) for p in prompted]
        )
        changes = torch.stack([_intensity_change(region, p) for p in prompted])
        to_prompts, from_prompts = prompts.amax(dim=0), changes.amin(dim=0)
        if previous is None:
            to_previous, from_previous = to_prompts, from_prompts
        else:
            to_previous = (region.descriptor * previous.descriptor.to(region.descriptor)).sum(dim=1)
            from_previous = _intensity_change(region, previous)
        ratio = (
            torch.zeros_like(area) if previous_area is None else torch.log((area + 1) / (previous_area + 1))
        )
        return torch.stack([to_prompts, to_previous, iou.float(), ratio, from_prompts, from_previous], dim=1)

    def forward(self, cues: torch.Tensor) -> torch.Tensor:
        return (cues @ self.weight.to(cues) + self.bias.to(cues)).unsqueeze(1)


def _intensity_change(region: Region, earlier: Region) -> torch.Tensor:
    """``[B]``: how far the region's mean intensity lies from an earlier region's, in its spreads."""
    earlier_intensity = earlier.intensity.to(region.intensity)
    spread = earlier_intensity[:, 1] + _INTENSITY_SPREAD_FLOOR
    return (region.intensity[:, 0] - earlier_intensity[:, 0]).abs() / spread
