"""One training sequence through the real tracking code path, and its losses.

The sequence is run exactly as :class:`medsam2.Session` runs a volume: ``SAM2Model.predict`` on the prompted
first frame, ``encode_memory`` of every frame, and for each later frame the memory policy's
``MemoryContext`` (``medsam2.memory``) fed to ``predict``; a corrective click re-predicts its frame with the
previous logits and turns it into a prompted (conditioning) frame, as a correction in the session does. The
only difference is that the objects of a sequence are batched, and gradients flow through the memories.

Losses per prediction (SAM 2's, weights 20 : 1 : 1 : 1): focal and dice on the mask candidate with the
smallest mask loss, MSE of every candidate's predicted IoU against its actual IoU, and binary cross-entropy
of the object score against presence. Mask and IoU terms count the objects present in the target, on the
decoder's masks before the no-object fill: the object-score head is new, and while it still calls a present
object absent the masks must go on learning (SAM 2 trains from a pretrained head and counts only objects
predicted present).

A model with a ``tracking_box_margin`` gets, on every tracked frame, the box of the previous frame's
prediction (consecutive slices) or of the prompted first frame's (shuffled slices), as the session gives it;
an object it has lost (``SAM2Model.lost_objects``) stays absent, and no loss reaches its decoding. A
``memory_only`` sequence gives it no box: its tracked frames are decoded from the memory-conditioned embedding
alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..memory import FrameRecord, MemoryOptions, ObjectTrack, frame_descriptor, make_policy
from ..model.sam2 import ImageFeatures, MaskPrediction, SAM2Model
from .sequences import Sequence, SequenceSampler

FOCAL_WEIGHT, DICE_WEIGHT, IOU_WEIGHT, PRESENCE_WEIGHT = 20.0, 1.0, 1.0, 1.0
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
# Previous logits given back with a corrective click are clipped, as the session does.
PREVIOUS_LOGIT_CLIP = 32.0


@dataclass
class LossTotals:
    """Sums over the predictions of one sequence (divided by ``count`` for the reported means)."""

    focal: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    dice: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    iou: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    presence: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    count: int = 0

    def add(self, terms: dict[str, torch.Tensor] | None) -> None:
        """Add one prediction's terms (``None``: all its objects were lost, nothing is counted)."""
        if terms is None:
            return
        for name, value in terms.items():
            setattr(self, name, getattr(self, name) + value)
        self.count += 1

    def total(self) -> torch.Tensor:
        weighted = (
            FOCAL_WEIGHT * self.focal
            + DICE_WEIGHT * self.dice
            + IOU_WEIGHT * self.iou
            + PRESENCE_WEIGHT * self.presence
        )
        return weighted / max(self.count, 1)

    def means(self) -> dict[str, float]:
        n = max(self.count, 1)
        out = {k: float(getattr(self, k).detach()) / n for k in ("focal", "dice", "iou", "presence")}
        out["loss"] = float(self.total().detach())
        return out


def prediction_losses(prediction: MaskPrediction, target: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Loss terms of one prediction for targets ``[B, S, S]`` bool (candidates are at ``S`` for lite);
    ``None`` when every object was lost (nothing was predicted, nothing can learn)."""
    decoded = (
        torch.ones(len(target), dtype=torch.bool, device=target.device)
        if prediction.lost is None
        else ~prediction.lost
    )
    if not bool(decoded.any()):
        return None
    present = target.flatten(1).any(dim=1).float() * decoded  # [B]
    score = prediction.object_score.reshape(-1).float()
    presence = F.binary_cross_entropy_with_logits(score[decoded], present[decoded])
    zero = score.new_zeros(())
    if prediction.candidate_logits is None:  # a mask prompt is its own answer: only the pointer matters
        return {"focal": zero, "dice": zero, "iou": zero, "presence": presence}
    logits = prediction.candidate_logits.float()  # [B, M, s, s]
    tgt = target.float()[:, None]
    if logits.shape[-2:] != tgt.shape[-2:]:
        tgt = F.interpolate(tgt, size=logits.shape[-2:], mode="bilinear", align_corners=False)
        tgt = (tgt > 0.5).float()
    tgt = tgt.expand_as(logits)
    prob = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, tgt, reduction="none")
    p_t = prob * tgt + (1 - prob) * (1 - tgt)
    alpha_t = FOCAL_ALPHA * tgt + (1 - FOCAL_ALPHA) * (1 - tgt)
    focal = (alpha_t * (1 - p_t) ** FOCAL_GAMMA * bce).flatten(2).mean(-1)  # [B, M]
    inter = (prob * tgt).flatten(2).sum(-1)
    dice = 1 - (2 * inter + 1) / (prob.flatten(2).sum(-1) + tgt.flatten(2).sum(-1) + 1)  # [B, M]
    with torch.no_grad():
        binary = logits > 0
        hard_inter = (binary & (tgt > 0)).flatten(2).sum(-1).float()
        union = (binary | (tgt > 0)).flatten(2).sum(-1).float()
        actual_iou = hard_inter / union.clamp_min(1)
    iou = ((prediction.candidate_ious.float() - actual_iou) ** 2).mean(-1)  # [B]
    best = torch.argmin(FOCAL_WEIGHT * focal + DICE_WEIGHT * dice, dim=1)
    rows = torch.arange(len(best), device=best.device)
    denom = present.sum().clamp_min(1)
    return {
        "focal": (focal[rows, best] * present).sum() / denom,
        "dice": (dice[rows, best] * present).sum() / denom,
        "iou": (iou * present).sum() / denom,
        "presence": presence,
    }


def position_encoding(model: SAM2Model) -> torch.nn.Module:
    """The image encoder's position encoding of its lowest-resolution level (features come from a cache)."""
    encoder = model.image_encoder
    return getattr(encoder, "position_encoding", None) or encoder.neck.position_encoding


def run_sequence(
    model: SAM2Model,
    sequence: Sequence,
    sampler: SequenceSampler | None,
    memory: MemoryOptions | None = None,
    seed: int = 0,
) -> tuple[LossTotals, list[torch.Tensor]]:
    """Track ``sequence``'s objects through its frames; returns the losses and per-frame logits.

    ``sampler`` supplies the corrective clicks (``None``: no corrections, as in evaluation). The logits are
    ``[B, 1, s, s]`` per frame, in sequence order.
    """
    device = model.device
    config = model.config
    features = sequence.features.to(device)
    masks = sequence.masks.to(device)
    batch, frames = masks.shape[:2]
    position = position_encoding(model)(features[:1]).to(features.dtype)
    options = memory or MemoryOptions(policy="recent")
    policy = make_policy(config, options)
    track = ObjectTrack(obj_id=1, generator=torch.Generator().manual_seed(seed))
    policy.start_pass(track)
    totals, outputs = LossTotals(), []

    def frame_features(t: int) -> ImageFeatures:
        return ImageFeatures(
            features[t : t + 1].expand(batch, -1, -1, -1), position.expand(batch, -1, -1, -1), None
        )

    descriptors = [frame_descriptor(features[t : t + 1], options.descriptor_grid) for t in range(frames)]

    def record(t: int, prediction: MaskPrediction, binarize: bool) -> FrameRecord:
        # With a batch, the bank's confidence test uses the least confident object (batches of 1 in eval).
        rec = FrameRecord(
            frame=t,
            low_res_logits=prediction.low_res_logits,
            obj_ptr=prediction.obj_ptr,
            object_score=float(prediction.object_score.detach().min()),
            iou=float(prediction.iou.detach().min()),
            descriptor=descriptors[t],
        )
        if t < frames - 1:  # no later frame reads the last frame's memory
            rec.memory = model.encode_memory(
                frame_features(t), prediction.high_res_logits, prediction.object_score, binarize
            )
        return rec

    # The prompted first frame: no memory yet.
    first = frame_features(0)
    if sequence.prompt == "mask":
        prediction = model.predict(first, None, mask=masks[:, 0, None].float())
    else:
        points = (sequence.points.to(device), sequence.labels.to(device))
        prediction = model.predict(first, None, points=points)
    totals.add(prediction_losses(prediction, masks[:, 0]))
    track.conditioning[0] = record(0, prediction, binarize=True)
    outputs.append(prediction.low_res_logits)

    for t in range(1, frames):
        features_t = frame_features(t)
        context = policy.context(track, t, False, frames, descriptors[t])
        previous = (outputs[-1] if sequence.consecutive else outputs[0]).detach()
        prediction = model.track(features_t, context, None if sequence.memory_only else previous)
        totals.add(prediction_losses(prediction, masks[:, t]))
        corrected = sampler is not None and t in sequence.corrections
        if corrected:
            click = sampler.corrective_click(prediction.high_res_logits[:, 0] > 0, masks[:, t])
            previous = prediction.low_res_logits.clamp(-PREVIOUS_LOGIT_CLIP, PREVIOUS_LOGIT_CLIP)
            points = (click[0].to(device), click[1].to(device))
            prediction = model.predict(features_t, context, points=points, previous_logits=previous)
            totals.add(prediction_losses(prediction, masks[:, t]))
        rec = record(t, prediction, binarize=corrected)
        if corrected:
            track.conditioning[t] = rec
        else:
            track.tracked[t] = rec
            policy.observe(track, rec)
        outputs.append(prediction.low_res_logits)
    return totals, outputs
