"""The 2D one-prompt setting of ``medsam2 train evaluate``: a box on the TotalSegmentator CT slice where a
structure is largest is the only prompt; ``segment_images`` then segments that structure in other CT slices
and in MR slices (another volume and modality). Baseline: the template's box, scaled, on every image, without
memory."""

from __future__ import annotations

import numpy as np

from .. import metrics
from ..demo import box_on_largest_slice
from ..images import segment_images
from ..model.sam2 import SAM2Model
from ..preprocess import prepare_intensities
from .evaluate import AxialSlices
from .heldout import ONE_PROMPT_VOLUMES, HeldOutVolume


def one_prompt_2d(
    model: SAM2Model,
    volumes: list[HeldOutVolume],
    baseline: SAM2Model | None = None,
    images_per_volume: int = 4,
) -> dict:
    """The 2D one-prompt setting between the TotalSegmentator CT (template) and MR volumes."""
    by_name = {v.name: v for v in volumes}
    if not set(ONE_PROMPT_VOLUMES) <= set(by_name):
        return {}
    ct, mr = (by_name[n] for n in ONE_PROMPT_VOLUMES)
    ct_int, mr_int = (prepare_intensities(v.image, modality=v.modality) for v in (ct, mr))
    out = {}
    for name in sorted(set(ct.structures) & set(mr.structures)):
        ct_mask, mr_mask = ct.mask(name), mr.mask(name)
        template, box = box_on_largest_slice(ct_mask)
        images, truths, sources = [ct_int[template]], [ct_mask[template]], ["CT template"]
        for source, intensities, mask in (("CT", ct_int, ct_mask), ("MR", mr_int, mr_mask)):
            present = np.nonzero(mask.any(axis=(1, 2)))[0]
            picks = np.unique(
                present[np.linspace(0, len(present) - 1, images_per_volume + 2)[1:-1].astype(int)]
            )
            for z in picks:
                if source == "CT" and z == template:
                    continue
                images.append(intensities[z])
                truths.append(mask[z])
                sources.append(source)
        predicted = segment_images(model, images, box=box)
        transferred = [
            _template_box_answer(baseline or model, image, box, ct_int.shape[1:]) for image in images[1:]
        ]
        rows = []
        for i in range(1, len(images)):
            rows.append(
                {
                    "source": sources[i],
                    "one_prompt_dice": round(metrics.dice(predicted[i], truths[i]), 4),
                    "template_box_dice": round(metrics.dice(transferred[i - 1], truths[i]), 4),
                }
            )
        out[name] = rows
    return out


def _template_box_answer(
    model: SAM2Model, image: np.ndarray, box: tuple[int, ...], template_shape: tuple[int, int]
) -> np.ndarray:
    """LiteMedSAM on ``image`` with the template's box scaled to the image's size (no memory)."""
    sy, sx = image.shape[0] / template_shape[0], image.shape[1] / template_shape[1]
    scaled = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    slices = AxialSlices(model, image[None])
    return slices.to_frame(slices.box_logits(0, slices.box_to_model(scaled)))
