"""The SAM 2 model: image features, memory-conditioned mask prediction, and memory encoding of a frame.

The model is stateless between frames: which memories a frame attends to is decided by the caller (a
memory policy in ``medsam2.memory``), which hands over a :class:`MemoryContext`. Spatial sizes below use
``S`` for the model's input size and ``h = w = S / backbone_stride`` for the lowest-resolution feature map.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..configs import ModelConfig
from .common import MLP
from .pieces import piece_boxes
from .presence import PresenceHead, Region, mask_area, typical_cells

# Logit given to every pixel of an object predicted absent (sigmoid of it is 0).
NO_OBJECT_LOGIT = -1024.0
# The least object score of an object the user prompted with a box or a positive click, where the model's
# config lets prompts assert presence (sigmoid(1) = 0.73: present, not certain).
PROMPTED_OBJECT_LOGIT = 1.0

# Logit scale and bias that turn a binary mask prompt into mask logits (sigmoid(-10) ~ 4.5e-5).
_MASK_PROMPT_SCALE, _MASK_PROMPT_BIAS = 20.0, -10.0


@dataclass
class ImageFeatures:
    """Image-encoder output for a batch of frames.

    ``embedding``/``position``: ``[B, C, h, w]``; ``high_res``: ``[B, C/8, 4h, 4w]`` and ``[B, C/4, 2h, 2w]``
    maps for the decoder's skip connections, already projected, or ``None`` for models without them;
    ``intensity``: ``[B, 1, h, w]`` the input image averaged onto the embedding's grid, for a model with a
    presence head (else ``None``).
    """

    embedding: torch.Tensor
    position: torch.Tensor
    high_res: list[torch.Tensor] | None
    intensity: torch.Tensor | None = None

    def frame(self, i: int) -> ImageFeatures:
        """The features of frame ``i`` of the batch, keeping a batch axis of 1."""
        high_res = None if self.high_res is None else [x[i : i + 1] for x in self.high_res]
        intensity = None if self.intensity is None else self.intensity[i : i + 1]
        return ImageFeatures(self.embedding[i : i + 1], self.position[i : i + 1], high_res, intensity)

    def expand(self, batch: int) -> ImageFeatures:
        """The same frame repeated for ``batch`` objects (a view, no copy)."""
        high_res = None if self.high_res is None else [x.expand(batch, -1, -1, -1) for x in self.high_res]
        intensity = None if self.intensity is None else self.intensity.expand(batch, -1, -1, -1)
        return ImageFeatures(
            self.embedding.expand(batch, -1, -1, -1),
            self.position.expand(batch, -1, -1, -1),
            high_res,
            intensity,
        )

    @property
    def nbytes(self) -> int:
        tensors = [self.embedding, self.position, *(self.high_res or [])]
        tensors += [] if self.intensity is None else [self.intensity]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class Memory:
    """A frame's encoded memory: ``features`` and ``position``, both ``[B, mem_dim, h, w]``."""

    features: torch.Tensor
    position: torch.Tensor


@dataclass
class MemoryContext:
    """What the current frame attends to.

    ``frames``: (memory, temporal slot) pairs, where slot ``num_maskmem - 1`` marks a prompted frame and slot
    ``d - 1`` a frame ``d`` steps away. ``pointers``: (signed frame distance, object pointer ``[B, C]``) pairs.
    ``pointer_range``: the distance that maps to 1 in the pointers' temporal encoding. ``regions``: the
    object's regions on its prompted frames, for a model with a presence head (:mod:`medsam2.model.presence`).
    """

    frames: list[tuple[Memory, int]]
    pointers: list[tuple[int, torch.Tensor]]
    pointer_range: int
    regions: list[Region] = field(default_factory=list)


@dataclass
class MaskPrediction:
    """The decoder's answer for one frame.

    ``low_res_logits``: ``[B, 1, 4h, 4w]``; ``high_res_logits``: ``[B, 1, S, S]``; ``iou``: ``[B]`` predicted
    IoU of the chosen mask; ``obj_ptr``: ``[B, C]``; ``object_score``: ``[B, 1]`` logit that the object is
    present. When the decoder ran, ``candidate_logits`` ``[B, M, 4h, 4w]`` and ``candidate_ious`` ``[B, M]``
    hold all its masks (M = 3 for an ambiguous prompt, else 1), before an absent object's no-object fill, so
    that training can teach the masks while the object score is still wrong. ``lost``: ``[B]`` True for the
    objects a box-tracking model had lost, for which nothing was decoded (``None``: none). ``region``: what the
    predicted mask covers (:class:`~medsam2.model.presence.Region`), for a model with a presence head.
    """

    low_res_logits: torch.Tensor
    high_res_logits: torch.Tensor
    iou: torch.Tensor
    obj_ptr: torch.Tensor
    object_score: torch.Tensor
    candidate_logits: torch.Tensor | None = None
    candidate_ious: torch.Tensor | None = None
    lost: torch.Tensor | None = None
    region: Region | None = None


def _pooled(x: torch.Tensor, pool: int) -> torch.Tensor:
    """``[B, C, h, w]`` averaged over ``pool x pool`` cells (identity for 1)."""
    return x if pool == 1 else F.avg_pool2d(x, pool)


def sine_encoding_1d(positions: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Transformer-style sine/cosine encoding of scalar positions: ``[N]`` -> ``[N, dim]``."""
    half = dim // 2
    exponent = 2 * (torch.arange(half, dtype=torch.float32, device=positions.device) // 2) / half
    angles = positions.float().unsqueeze(-1) / temperature**exponent
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class SAM2Model(nn.Module):
    """SAM 2 with its memory: the parts are built by :func:`medsam2.build_model`.

    Submodule and parameter names follow the official checkpoints, so their state dicts load unchanged.
    """

    def __init__(
        self,
        config: ModelConfig,
        image_encoder: nn.Module,
        memory_attention: nn.Module,
        memory_encoder: nn.Module,
        prompt_encoder: nn.Module,
        mask_decoder: nn.Module,
    ) -> None:
        super().__init__()
        self.config = config
        c, mem = config.hidden_dim, config.mem_dim
        self.maskmem_tpos_enc = nn.Parameter(torch.zeros(config.num_maskmem, 1, 1, mem))
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, c))
        self.no_mem_pos_enc = nn.Parameter(torch.zeros(1, 1, c))
        self.no_obj_ptr = nn.Parameter(torch.zeros(1, c)) if config.pred_obj_scores else None
        self.no_obj_embed_spatial = nn.Parameter(torch.zeros(1, mem)) if config.no_obj_embed_spatial else None
        for p in (self.maskmem_tpos_enc, self.no_mem_embed, self.no_mem_pos_enc, self.no_obj_ptr):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        if self.no_obj_embed_spatial is not None:
            nn.init.trunc_normal_(self.no_obj_embed_spatial, std=0.02)

        self.image_encoder = image_encoder
        # Turns a full-resolution mask into a decoder mask prompt, to get an object pointer for a mask prompt.
        self.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)
        self.memory_attention = memory_attention
        # Per-channel scale of the pooled attention's change to the embedding (a LayerScale): training from
        # a pretrained decoder starts it at zero, so that tracking starts from the decoder's own answers.
        pooled = config.memory_attention_pool > 1
        self.memory_attention_scale = nn.Parameter(torch.ones(c)) if pooled else None
        self.memory_encoder = memory_encoder
        self.sam_prompt_encoder = prompt_encoder
        self.sam_mask_decoder = mask_decoder
        self.obj_ptr_proj = MLP(c, c, c, num_layers=3)
        self.obj_ptr_tpos_proj = nn.Linear(c, mem) if config.proj_tpos_enc_in_obj_ptrs else None
        self.presence_head = PresenceHead() if config.presence_head else None
        # Reduced-precision dtype for CUDA autocast at inference, or None for float32 (set by load_model).
        self.autocast_dtype: torch.dtype | None = None

    # ------------------------------------------------------------------ sizes

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def device(self) -> torch.device:
        return self.maskmem_tpos_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.maskmem_tpos_enc.dtype

    # ------------------------------------------------------------------ image

    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        """Normalised images ``[B, 3, S, S]`` -> :class:`ImageFeatures`."""
        out = self.image_encoder(images)
        levels, positions = out["backbone_fpn"], out["vision_pos_enc"]
        high_res = None
        if self.config.use_high_res_features:
            high_res = [self.sam_mask_decoder.conv_s0(levels[0]), self.sam_mask_decoder.conv_s1(levels[1])]
        intensity = None
        if self.presence_head is not None:
            intensity = F.adaptive_avg_pool2d(images.mean(dim=1, keepdim=True), levels[-1].shape[-2:])
        return ImageFeatures(levels[-1], positions[-1], high_res, intensity)

    # ------------------------------------------------------------------ memory

    def attend_memory(self, features: ImageFeatures, context: MemoryContext | None) -> torch.Tensor:
        """The frame's embedding conditioned on memory: ``[B, C, h, w]``.

        Without memory (the first prompted frame of an object) the learnt no-memory embedding is added instead.
        With ``config.memory_attention_pool = p > 1`` attention runs on ``p x p`` average-pooled maps (current
        frame and memories alike, ``p^4`` times cheaper) and its change to the pooled map is upsampled, scaled
        per channel by ``memory_attention_scale`` and added to the full-resolution embedding, which keeps its
        detail for the decoder.
        """
        embedding = features.embedding
        b, c, h, w = embedding.shape
        if context is None or not context.frames:
            return embedding + self.no_mem_embed.view(1, c, 1, 1)
        pool = self.config.memory_attention_pool
        current, current_pos = _pooled(embedding, pool), _pooled(features.position, pool)
        tokens, token_pos = [], []
        for memory, slot in context.frames:
            tokens.append(_pooled(memory.features.to(embedding.dtype), pool).flatten(2).permute(2, 0, 1))
            pos = _pooled(memory.position.to(embedding.dtype), pool).flatten(2).permute(2, 0, 1)
            token_pos.append(pos + self.maskmem_tpos_enc[slot])
        num_pointer_tokens = 0
        if context.pointers:
            pointer_tokens, pointer_pos = self._pointer_tokens(context, b)
            tokens.append(pointer_tokens)
            token_pos.append(pointer_pos)
            num_pointer_tokens = pointer_tokens.shape[0]
        out = self.memory_attention(
            curr=current.flatten(2).permute(2, 0, 1),
            memory=torch.cat(tokens),
            curr_pos=current_pos.flatten(2).permute(2, 0, 1),
            memory_pos=torch.cat(token_pos),
            num_obj_ptr_tokens=num_pointer_tokens,
        )
        out = out.permute(1, 2, 0).reshape(current.shape)
        if pool == 1:
            return out
        change = F.interpolate(out - current, size=(h, w), mode="bilinear", align_corners=False)
        return embedding + self.memory_attention_scale.view(1, c, 1, 1) * change

    def _pointer_tokens(self, context: MemoryContext, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Object pointers as memory tokens: ``[N * C/mem_dim, B, mem_dim]`` and their encodings."""
        c, mem = self.config.hidden_dim, self.config.mem_dim
        distances, pointers = zip(*context.pointers)
        pointers = torch.stack(pointers)  # [N, B, C]
        if self.config.add_tpos_enc_to_obj_ptrs:
            rel = torch.tensor(distances, device=pointers.device) / max(context.pointer_range, 1)
            pos = sine_encoding_1d(rel, c if self.obj_ptr_tpos_proj is not None else mem).to(pointers.dtype)
            if self.obj_ptr_tpos_proj is not None:
                pos = self.obj_ptr_tpos_proj(pos)
            pos = pos.unsqueeze(1).expand(-1, batch, mem)
        else:
            pos = pointers.new_zeros(len(distances), batch, mem)
        # A 256-d pointer becomes C / mem_dim tokens of mem_dim so that it fits the memory width.
        split = c // mem
        pointers = pointers.reshape(-1, batch, split, mem).permute(0, 2, 1, 3).flatten(0, 1)
        return pointers, pos.repeat_interleave(split, dim=0)

    def encode_memory(
        self,
        features: ImageFeatures,
        high_res_logits: torch.Tensor,
        object_score: torch.Tensor,
        binarize: bool,
    ) -> Memory:
        """Memory of a frame from its raw embedding and predicted mask logits ``[B, 1, S, S]``.

        ``binarize`` thresholds the mask instead of taking its sigmoid (masks predicted from clicks).
        """
        mask = (high_res_logits > 0).to(high_res_logits.dtype) if binarize else high_res_logits.sigmoid()
        mask = mask * self.config.sigmoid_scale_for_mem_enc + self.config.sigmoid_bias_for_mem_enc
        out = self.memory_encoder(
            features.embedding, mask.to(features.embedding.dtype), skip_mask_sigmoid=True
        )
        mem_features, mem_pos = out["vision_features"], out["vision_pos_enc"][-1]
        if self.no_obj_embed_spatial is not None:
            absent = (object_score <= 0).to(mem_features.dtype)[..., None, None]
            mem_features = mem_features + absent * self.no_obj_embed_spatial[..., None, None]
        return Memory(mem_features, mem_pos)

    # ------------------------------------------------------------------ masks

    def predict(
        self,
        features: ImageFeatures,
        context: MemoryContext | None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        previous_logits: torch.Tensor | None = None,
        user_prompt: bool = False,
        more_boxes: tuple[tuple[torch.Tensor, torch.Tensor], ...] = (),
    ) -> MaskPrediction:
        """Predict the object's mask on one frame.

        ``points``: coordinates ``[B, N, 2]`` in input pixels (0..S) and labels ``[B, N]`` (1 positive,
        0 negative, 2/3 box corners). ``mask``: a binary mask prompt ``[B, 1, S, S]``, used as the output
        directly. ``previous_logits``: ``[B, 1, 4h, 4w]`` logits of an earlier prediction on this frame,
        refined by new clicks. Without any prompt the frame is tracked from ``context``. ``user_prompt``: the
        points are the user's, not a tracking box; with ``config.prompts_assert_presence`` a box or a positive
        click then keeps the object present on this frame whatever its object score. ``more_boxes``: further
        box prompts (as ``points``) decoded on the same memory-conditioned embedding, their masks united with
        that of ``points`` (:meth:`tracking_prompts`).
        """
        if mask is not None:
            prediction = self._mask_as_prediction(features, mask)
        else:
            embedding = self.attend_memory(features, context)
            num_points = 0 if points is None else points[1].shape[1]
            # One click (or none, while tracking) is ambiguous: take the best of the three candidate masks.
            multimask = num_points <= 1
            asserted = None
            if user_prompt and points is not None and self.config.prompts_assert_presence:
                asserted = (points[1] > 0).any(dim=1)  # a positive click (1) or box corners (2, 3)
            prediction = self._decode(
                embedding, features.high_res, points, previous_logits, multimask, asserted
            )
            for box in more_boxes:
                piece = self._decode(embedding, features.high_res, box, None, multimask=False)
                prediction = _united(prediction, piece)
        if self.presence_head is not None:
            prediction.region = Region.of(features, prediction.low_res_logits)
        return prediction

    def track(
        self,
        features: ImageFeatures,
        context: MemoryContext | None,
        previous_logits: torch.Tensor | None,
        guide: torch.Tensor | None = None,
        previous_region: Region | None = None,
    ) -> MaskPrediction:
        """Predict a tracked frame from ``context`` and, for a box-tracking model, the previous frame's logits
        ``[B, 1, H, W]`` (see :meth:`tracking_prompts`); objects that model has lost get :meth:`lost_prediction`.

        ``guide``: box corners ``[B, 2, 2]`` (input pixels) from an earlier pass over the same data, which a
        box-tracking model is prompted with (grown by its margin) instead of the previous frame's box; an
        object with a guide is never lost. Models that track from memory alone ignore it.

        A model with a presence head also judges whether each object is still there (:meth:`judge_presence`)
        against the prompted frames' regions in ``context`` and the previous frame's ``previous_region``;
        an object judged absent gets an empty mask, so a box-tracking model loses it there. Before that, with
        ``config.typical_intensity_spreads``, the mask keeps only the intensities the object has
        (:meth:`keep_typical`)."""
        if guide is not None and self.config.tracking_box_margin is not None:
            return self.predict(features, context, points=self._grown_box(guide.reshape(-1, 4).unbind(1)))
        lost = self.lost_objects(previous_logits)
        if lost is not None and bool(lost.all()):
            return self.lost_prediction(len(lost))
        prompts = self.tracking_prompts(previous_logits)
        first, more = (None, ()) if prompts is None else (prompts[0], tuple(prompts[1:]))
        prediction = self.predict(features, context, points=first, more_boxes=more)
        if self.presence_head is not None and context is not None and context.regions:
            if self.config.typical_intensity_spreads is not None and features.intensity is not None:
                prediction = self.keep_typical(prediction, features, context.regions)
            prediction = self.judge_presence(prediction, context.regions, previous_logits, previous_region)
        if lost is None or not bool(lost.any()):
            return prediction
        return _replace_rows(prediction, self.lost_prediction(len(lost)), lost)

    def judge_presence(
        self,
        prediction: MaskPrediction,
        prompted_regions: list[Region],
        previous_logits: torch.Tensor | None,
        previous_region: Region | None,
    ) -> MaskPrediction:
        """``prediction`` with its object score lowered to the presence head's logit where that is lower; an
        object now scored absent gets the no-object mask and pointer (its candidates stay for training)."""
        cues = PresenceHead.cues(
            prediction.region,
            prompted_regions,
            previous_region,
            prediction.iou,
            mask_area(prediction.low_res_logits),
            None if previous_logits is None else mask_area(previous_logits),
        )
        score = torch.minimum(prediction.object_score, self.presence_head(cues).to(prediction.object_score))
        absent = (score <= 0).reshape(-1)
        prediction.object_score = score
        if not bool(absent.any()):
            return prediction
        rows = absent.view(-1, 1, 1, 1)
        prediction.low_res_logits = prediction.low_res_logits.masked_fill(rows, NO_OBJECT_LOGIT)
        prediction.high_res_logits = prediction.high_res_logits.masked_fill(rows, NO_OBJECT_LOGIT)
        present = (~absent).to(prediction.obj_ptr.dtype)[:, None]
        prediction.obj_ptr = self._pointer_for_presence(prediction.obj_ptr, present)
        prediction.region = prediction.region.emptied(absent)
        return prediction

    def keep_typical(
        self, prediction: MaskPrediction, features: ImageFeatures, prompted_regions: list[Region]
    ) -> MaskPrediction:
        """``prediction`` with its mask cut to the cells of typical intensity for the object
        (:func:`~medsam2.model.presence.typical_cells`), and the holes that cut opens inside the mask filled
        again: vessels inside a lung are atypical, yet the lung around them keeps them."""
        typical = typical_cells(
            features.intensity.float(), prompted_regions, self.config.typical_intensity_spreads
        )
        kept = _fill_holes((prediction.low_res_logits > 0) & _resized(typical, prediction.low_res_logits))
        prediction.low_res_logits = prediction.low_res_logits.masked_fill(~kept, NO_OBJECT_LOGIT)
        high_res_kept = _resized(kept, prediction.high_res_logits)
        prediction.high_res_logits = prediction.high_res_logits.masked_fill(~high_res_kept, NO_OBJECT_LOGIT)
        prediction.region = Region.of(features, prediction.low_res_logits)
        return prediction

    def lost_objects(self, previous_logits: torch.Tensor | None) -> torch.Tensor | None:
        """``[B]`` True for the objects a box-tracking model has lost: their previous mask is empty, so there
        is no box, and a decoder trained on box prompts alone draws a mask anywhere without one. ``None`` for
        models that track from memory alone, and on a frame without a previous one."""
        if self.config.tracking_box_margin is None or previous_logits is None:
            return None
        return ~(previous_logits > 0).flatten(1).any(dim=1)

    def lost_prediction(self, batch: int) -> MaskPrediction:
        """The answer for lost objects, with nothing decoded: no mask, "absent", the no-object pointer."""
        side = 4 * self.config.image_embedding_size
        low_res = torch.full((batch, 1, side, side), NO_OBJECT_LOGIT, device=self.device)
        pointer = self.no_obj_ptr if self.no_obj_ptr is not None else torch.zeros(1, self.config.hidden_dim)
        return MaskPrediction(
            low_res_logits=low_res,
            high_res_logits=self.upsample_logits(low_res),
            iou=torch.zeros(batch, device=self.device),
            obj_ptr=pointer.to(self.device).expand(batch, -1),
            object_score=torch.full((batch, 1), _MASK_PROMPT_BIAS, device=self.device),
            lost=torch.ones(batch, dtype=torch.bool, device=self.device),
        )

    def tracking_prompt(
        self, previous_logits: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The box prompt of a tracked frame, from the previous frame's logits ``[B, 1, H, W]`` (any size).

        With ``config.tracking_box_margin = m`` the box of each object's mask (logits > 0), grown on each side
        by ``m`` times its longer side (at least 2 px) and clipped to the image, as corner points ``[B, 2, 2]``
        in input pixels with labels ``[B, 2]`` (2, 3). An object with an empty mask (lost, see
        :meth:`lost_objects`) gets the whole image. ``None`` (track from memory alone) when the model has no
        margin or there is no previous frame.
        """
        lost = self.lost_objects(previous_logits)
        if lost is None:
            return None
        mask = previous_logits[:, 0] > 0  # [B, H, W]
        mask[lost] = True
        rows, cols = mask.any(dim=2), mask.any(dim=1)  # [B, H], [B, W]
        scale = self.image_size / mask.shape[-1]

        def extent(hit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            index = torch.arange(hit.shape[1], device=hit.device)
            first = torch.where(hit, index, hit.shape[1]).amin(dim=1)
            last = torch.where(hit, index, -1).amax(dim=1)
            return first.float() * scale, (last + 1).float() * scale

        (y0, y1), (x0, x1) = extent(rows), extent(cols)
        return self._grown_box((x0, y0, x1, y1))

    def tracking_prompts(
        self, previous_logits: torch.Tensor | None
    ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The box prompts of a tracked frame: ``[tracking_prompt(previous_logits)]``, unless some object's
        previous mask is in several pieces (:mod:`.pieces`). Then prompt ``j`` holds the box of each such
        object's ``j``-th piece, the largest first (its largest again where it has fewer), grown as in
        :meth:`tracking_prompt`; the other objects keep their one box in every prompt. ``None`` as there."""
        whole = self.tracking_prompt(previous_logits)
        if whole is None:
            return None
        pieces = piece_boxes(previous_logits[:, 0] > 0)
        count = max(len(boxes) for boxes in pieces)
        if count < 2:
            return [whole]
        scale = self.image_size / previous_logits.shape[-1]
        prompts = []
        for j in range(count):
            corners = whole[0].clone()
            for obj, boxes in enumerate(pieces):
                if len(boxes) > 1:
                    piece = boxes[j if j < len(boxes) else 0]
                    edges = (torch.tensor([v * scale], device=corners.device) for v in piece)
                    corners[obj] = self._grown_box(tuple(edges))[0][0]
            prompts.append((corners, whole[1]))
        return prompts

    def _grown_box(self, box: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Box edges ``(x0, y0, x1, y1)``, each ``[B]`` in input pixels, grown on each side by the tracking
        margin times the longer side (at least 2 px) and clipped to the image: corner points ``[B, 2, 2]``
        and labels ``[B, 2]`` (2, 3)."""
        x0, y0, x1, y1 = (edge.float() for edge in box)
        grow = (self.config.tracking_box_margin * torch.maximum(x1 - x0, y1 - y0)).clamp_min(2.0)
        corners = torch.stack([x0 - grow, y0 - grow, x1 + grow, y1 + grow], dim=1).clamp(0, self.image_size)
        labels = torch.tensor([[2, 3]], dtype=torch.int32, device=corners.device).expand(len(corners), 2)
        return corners.reshape(-1, 2, 2), labels

    def _decode(
        self,
        embedding: torch.Tensor,
        high_res: list[torch.Tensor] | None,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        mask_logits: torch.Tensor | None,
        multimask: bool,
        asserted: torch.Tensor | None = None,
    ) -> MaskPrediction:
        """``asserted``: ``[B]`` True for objects the user's prompt says are present (score raised to
        ``PROMPTED_OBJECT_LOGIT`` at least)."""
        b = embedding.shape[0]
        if points is None:
            # The decoder always gets a point; a padding point (label -1) stands for "no click".
            points = (
                embedding.new_zeros(b, 1, 2),
                -torch.ones(b, 1, dtype=torch.int32, device=embedding.device),
            )
        if mask_logits is not None:
            mask_size = tuple(4 * s for s in embedding.shape[-2:])
            if mask_logits.shape[-2:] != mask_size:
                mask_logits = F.interpolate(
                    mask_logits.float(), size=mask_size, mode="bilinear", align_corners=False, antialias=True
                )
            mask_logits = mask_logits.to(embedding.dtype)
        boxes = None
        if not self.config.box_padding_token and bool((points[1][:, :2] >= 2).all()):
            # SAM / LiteMedSAM convention: the box is two tokens of its own and no padding token follows.
            boxes = points[0][:, :2].reshape(b, 4)
            points = None if points[1].shape[1] == 2 else (points[0][:, 2:], points[1][:, 2:])
        sparse, dense = self.sam_prompt_encoder(points=points, boxes=boxes, masks=mask_logits)
        masks, ious, tokens, object_score = self.sam_mask_decoder(
            image_embeddings=embedding,
            image_pe=self.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            repeat_image=False,
            high_res_features=high_res,
        )
        if asserted is not None:
            raised = object_score.clamp_min(PROMPTED_OBJECT_LOGIT)
            object_score = torch.where(asserted.view(-1, 1), raised, object_score)
        present = object_score > 0
        candidates = masks.float()
        if self.config.pred_obj_scores:
            masks = torch.where(present[:, None, None], masks, NO_OBJECT_LOGIT)
        masks = masks.float()
        best = (
            torch.argmax(ious, dim=-1) if multimask else torch.zeros(b, dtype=torch.long, device=masks.device)
        )
        rows = torch.arange(b, device=masks.device)
        low_res = masks[rows, best].unsqueeze(1)
        token = tokens[rows, best] if tokens.shape[1] > 1 else tokens[:, 0]
        obj_ptr = self.obj_ptr_proj(token)
        if self.config.pred_obj_scores:
            obj_ptr = self._pointer_for_presence(obj_ptr, present.to(obj_ptr.dtype))
        return MaskPrediction(
            low_res_logits=low_res,
            high_res_logits=self.upsample_logits(low_res),
            iou=ious[rows, best].float(),
            obj_ptr=obj_ptr,
            object_score=object_score.float(),
            candidate_logits=candidates,
            candidate_ious=ious.float(),
        )

    def _mask_as_prediction(self, features: ImageFeatures, mask: torch.Tensor) -> MaskPrediction:
        """A mask prompt is taken as the frame's answer; the decoder only supplies its object pointer."""
        mask = mask.to(features.embedding.dtype)
        high_res = (mask * _MASK_PROMPT_SCALE + _MASK_PROMPT_BIAS).float()
        low_res = F.interpolate(
            high_res,
            size=tuple(4 * s for s in features.embedding.shape[-2:]),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
        # The pointer comes from the raw (memory-free) embedding with the mask as the decoder's mask prompt.
        decoded = self._decode(
            features.embedding, features.high_res, None, self.mask_downsample(mask), multimask=False
        )
        present = (mask.flatten(1) > 0).any(dim=1, keepdim=True).to(decoded.obj_ptr.dtype)
        obj_ptr = decoded.obj_ptr
        if self.config.pred_obj_scores:
            obj_ptr = self._pointer_for_presence(obj_ptr, present)
        return MaskPrediction(
            low_res_logits=low_res,
            high_res_logits=high_res,
            iou=torch.ones(mask.shape[0], device=mask.device),
            obj_ptr=obj_ptr,
            object_score=(present * _MASK_PROMPT_SCALE + _MASK_PROMPT_BIAS).float(),
        )

    def _pointer_for_presence(self, obj_ptr: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """An absent object gets the learnt no-object pointer instead of its own."""
        return present * obj_ptr + (1 - present) * self.no_obj_ptr

    def upsample_logits(self, low_res: torch.Tensor) -> torch.Tensor:
        """``[B, 1, 4h, 4w]`` logits -> ``[B, 1, S, S]`` (bilinear)."""
        size = (self.image_size, self.image_size)
        return F.interpolate(low_res, size=size, mode="bilinear", align_corners=False)


def _resized(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Boolean ``mask`` ``[B, 1, h, w]`` on ``like``'s grid (nearest)."""
    if mask.shape[-2:] == like.shape[-2:]:
        return mask
    return F.interpolate(mask.float(), size=like.shape[-2:], mode="nearest") > 0.5


def _fill_holes(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` ``[B, 1, H, W]`` with every background region that does not touch the border filled."""
    from scipy import ndimage

    filled = [ndimage.binary_fill_holes(m[0]) for m in mask.cpu().numpy()]
    return torch.from_numpy(np.stack(filled)[:, None]).to(mask.device)


def _united(prediction: MaskPrediction, piece: MaskPrediction) -> MaskPrediction:
    """``prediction`` with ``piece``'s mask (and candidate mask, both from one box) added to its own; the object
    score, IoU and pointer are those of the more confident of the two."""
    surer = (piece.object_score > prediction.object_score).reshape(-1)
    prediction.low_res_logits = torch.maximum(prediction.low_res_logits, piece.low_res_logits)
    prediction.high_res_logits = torch.maximum(prediction.high_res_logits, piece.high_res_logits)
    prediction.candidate_logits = torch.maximum(prediction.candidate_logits, piece.candidate_logits)
    prediction.candidate_ious = torch.where(surer[:, None], piece.candidate_ious, prediction.candidate_ious)
    prediction.iou = torch.where(surer, piece.iou, prediction.iou)
    prediction.obj_ptr = torch.where(surer[:, None], piece.obj_ptr, prediction.obj_ptr)
    prediction.object_score = torch.maximum(prediction.object_score, piece.object_score)
    return prediction


def _replace_rows(prediction: MaskPrediction, other: MaskPrediction, rows: torch.Tensor) -> MaskPrediction:
    """``prediction`` with the objects where ``rows`` ``[B]`` is True taken from ``other`` and marked lost;
    the decoder's candidates of those objects become no-object logits (zero IoU)."""

    def pick(mine: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
        where = rows.view(-1, *[1] * (mine.dim() - 1))
        return torch.where(where, theirs.to(mine.dtype), mine)

    out = MaskPrediction(
        low_res_logits=pick(prediction.low_res_logits, other.low_res_logits),
        high_res_logits=pick(prediction.high_res_logits, other.high_res_logits),
        iou=pick(prediction.iou, other.iou),
        obj_ptr=pick(prediction.obj_ptr, other.obj_ptr),
        object_score=pick(prediction.object_score, other.object_score),
        lost=rows,
    )
    if prediction.candidate_logits is not None:
        out.candidate_logits = pick(prediction.candidate_logits, torch.tensor(NO_OBJECT_LOGIT))
        out.candidate_ious = pick(prediction.candidate_ious, torch.tensor(0.0))
    return out
