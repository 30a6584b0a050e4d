"""Held-out check of the memory: tracking organs through slicerio's CTChest4 (never used for training).

For each organ, the axial slice where it is largest gets a mask prompt; the model tracks the organ from
there towards both ends of the volume (two passes, as ``segment_volume`` does on the prompt axis) and the
3D Dice against the reference segmentation is reported. Baseline without memory: LiteMedSAM slice by slice,
each slice prompted with the box of the previous slice's prediction (stopping when it comes back empty),
the approach DESIGN.md section 4 measured. Both use the same frozen features and the same model code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..memory import MemoryOptions
from ..model.sam2 import SAM2Model
from ..preprocess import prepare_intensities
from .data import lite_input, lite_labels, object_masks
from .sequences import Sequence
from .step import run_sequence

ORGANS = ("right lung", "left lung")


def load_ctchest4() -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """CTChest4 ``[Z, Y, X]`` in [0, 1] (abdomen window), its label map, and segment name -> label value."""
    import SimpleITK as sitk
    import slicerio

    folder = Path(slicerio.__file__).parent / "data"
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "CTChest4.nrrd")))
    seg = slicerio.read_segmentation(str(folder / "Segmentation.seg.nrrd"))
    labels = np.transpose(seg["voxels"], (2, 1, 0))  # slicerio gives IJK; the volume array is KJI
    values = {s["name"]: int(s["labelValue"]) for s in seg["segments"]}
    return prepare_intensities(volume, modality="ct"), labels, values


def encode_axial(model: SAM2Model, volume: np.ndarray) -> torch.Tensor:
    """Frozen features ``[Z, C, h, w]`` of every axial slice, prepared as for training."""
    size = model.image_size
    out = []
    with torch.inference_mode():
        for z in range(volume.shape[0]):
            image = torch.from_numpy(lite_input(volume[z], size)[0]).to(model.device)
            out.append(model.encode_image(image[None, None].expand(1, 3, -1, -1)).embedding.cpu())
    return torch.cat(out)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


@torch.inference_mode()
def track_with_memory(
    model: SAM2Model, features: torch.Tensor, targets: np.ndarray, start: int, memory: MemoryOptions
) -> np.ndarray:
    """Masks ``[Z, S, S]`` from a mask prompt on ``start``, tracked to both ends with ``memory``."""
    result = np.zeros(targets.shape, bool)
    for order in (list(range(start, len(features))), list(range(start, -1, -1))):
        sequence = Sequence(
            source="ctchest4",
            axis=0,
            positions=order,
            features=features[order],
            masks=torch.from_numpy(targets[order])[None],
            prompt="mask",
            points=None,
            labels=None,
            corrections=[],
        )
        _, logits = run_sequence(model, sequence, None, memory=memory)
        for z, lr in zip(order, logits):
            result[z] = (model.upsample_logits(lr)[0, 0] > 0).cpu().numpy()
    return result


@torch.inference_mode()
def track_with_boxes(model: SAM2Model, features: torch.Tensor, targets: np.ndarray, start: int) -> np.ndarray:
    """LiteMedSAM slice by slice: each slice gets the box of its neighbour's prediction, no memory."""
    result = np.zeros(targets.shape, bool)
    result[start] = targets[start]
    for step in (1, -1):
        previous = targets[start]
        z = start + step
        while 0 <= z < len(features) and previous.any():
            rows, cols = np.nonzero(previous)
            box = torch.tensor([[[cols.min(), rows.min()], [cols.max() + 1.0, rows.max() + 1.0]]])
            mask = litemedsam_box_mask(model, features[z : z + 1].to(model.device), box.to(model.device))
            result[z] = previous = mask
            z += step
    return result


def litemedsam_box_mask(model: SAM2Model, embedding: torch.Tensor, box: torch.Tensor) -> np.ndarray:
    """LiteMedSAM's own answer: its prompt encoder and decoder on the raw embedding ``[1, C, h, w]`` with a
    box ``[1, 2, 2]`` (two tokens, single mask output, no object score), upsampled to ``[S, S]``."""
    sparse, dense = model.sam_prompt_encoder(points=None, boxes=box.reshape(1, 4), masks=None)
    masks, _, _, _ = model.sam_mask_decoder(
        image_embeddings=embedding,
        image_pe=model.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
        repeat_image=False,
        high_res_features=None,
    )
    return (model.upsample_logits(masks[:, :1].float())[0, 0] > 0).cpu().numpy()


def evaluate(
    model: SAM2Model, organs: tuple[str, ...] = ORGANS, features_path: Path | None = None
) -> dict[str, dict[str, float]]:
    """3D Dice per organ: ``{"organ": {"recent": d, "self-sorting": d, "boxes (no memory)": d}}``.

    ``features_path``: a ``.pt`` file caching the frozen encoder's features of CTChest4 between runs.
    """
    volume, labels, values = load_ctchest4()
    if features_path is not None and Path(features_path).is_file():
        features = torch.load(features_path, weights_only=True)
    else:
        features = encode_axial(model, volume)
        if features_path is not None:
            torch.save(features, features_path)
    size = model.image_size
    results = {}
    for organ in organs:
        targets = np.stack(
            [object_masks(lite_labels(labels[z], size), [values[organ]])[0] for z in range(len(volume))]
        )
        start = int(np.argmax(targets.reshape(len(targets), -1).sum(1)))
        row = {}
        for policy in ("recent", "self-sorting"):
            masks = track_with_memory(model, features, targets, start, MemoryOptions(policy=policy))
            row[policy] = dice(masks, targets)
        row["boxes (no memory)"] = dice(track_with_boxes(model, features, targets, start), targets)
        results[organ] = row
    return results
