"""SAM's mask decoder: output tokens + prompt tokens go through the two-way transformer, then each mask
token becomes (via a hypernetwork MLP) the weights of a dot product with the upscaled image embedding.

Output tokens, in order: [object-score token (only with ``pred_obj_scores``)], IoU token, then
``num_multimask_outputs + 1`` mask tokens; mask token 0 is the single-mask output, 1.. the multimask outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from medsam2.model.common import MLP, LayerNorm2d

# Logit reported when the decoder has no object-score head: "the object is present" (sigmoid(10) ~ 1).
OBJECT_PRESENT_LOGIT = 10.0


class MaskDecoder(nn.Module):
    """Predicts mask logits at 4x the image-embedding resolution, their IoU and an object-presence logit.

    Args:
        transformer_dim: channel width ``C`` of tokens and image embedding.
        transformer: a ``TwoWayTransformer`` of width ``C``.
        num_multimask_outputs: masks predicted when disambiguating an ambiguous prompt.
        iou_head_depth, iou_head_hidden_dim: the IoU-prediction MLP.
        use_high_res_features: add the stride-4 / stride-8 backbone features while upscaling; they come
            already projected to ``C/8`` and ``C/4`` channels by ``conv_s0`` / ``conv_s1``, which the caller
            applies but which live here because the checkpoint keeps them here.
        iou_prediction_use_sigmoid: IoU predictions go through a sigmoid.
        dynamic_multimask_via_stability: at eval, when one mask is asked for and the single-mask output is
            unstable, return the multimask output with the best predicted IoU instead.
        dynamic_multimask_stability_delta: the logit band ``±delta`` that the stability score measures.
        dynamic_multimask_stability_thresh: stability scores below this count as unstable.
        pred_obj_scores: predict an object-presence logit from a dedicated token.
        pred_obj_scores_mlp: that head is a 3-layer MLP rather than one linear layer.
        use_multimask_token_for_obj_ptr: with ``multimask_output``, return the multimask tokens (used for
            the object pointer) instead of the single-mask token.
    """

    def __init__(
        self,
        transformer_dim: int,
        transformer: nn.Module,
        *,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        use_high_res_features: bool = False,
        iou_prediction_use_sigmoid: bool = False,
        dynamic_multimask_via_stability: bool = False,
        dynamic_multimask_stability_delta: float = 0.05,
        dynamic_multimask_stability_thresh: float = 0.98,
        pred_obj_scores: bool = False,
        pred_obj_scores_mlp: bool = False,
        use_multimask_token_for_obj_ptr: bool = False,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1

        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.pred_obj_scores = pred_obj_scores
        if pred_obj_scores:
            self.obj_score_token = nn.Embedding(1, transformer_dim)
        self.use_multimask_token_for_obj_ptr = use_multimask_token_for_obj_ptr

        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.use_high_res_features = use_high_res_features
        if use_high_res_features:
            self.conv_s0 = nn.Conv2d(transformer_dim, transformer_dim // 8, kernel_size=1)
            self.conv_s1 = nn.Conv2d(transformer_dim, transformer_dim // 4, kernel_size=1)

        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, num_layers=3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim,
            iou_head_hidden_dim,
            self.num_mask_tokens,
            num_layers=iou_head_depth,
            sigmoid_output=iou_prediction_use_sigmoid,
        )
        if pred_obj_scores:
            self.pred_obj_score_head = (
                MLP(transformer_dim, transformer_dim, 1, num_layers=3)
                if pred_obj_scores_mlp
                else nn.Linear(transformer_dim, 1)
            )

        self.dynamic_multimask_via_stability = dynamic_multimask_via_stability
        self.dynamic_multimask_stability_delta = dynamic_multimask_stability_delta
        self.dynamic_multimask_stability_thresh = dynamic_multimask_stability_thresh

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        repeat_image: bool,
        high_res_features: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode masks for a batch of ``B`` prompts.

        Args:
            image_embeddings: ``[B, C, h, w]``; ``[1, C, h, w]`` shared by all prompts with ``repeat_image``.
            image_pe: ``[1, C, h, w]`` from ``PromptEncoder.get_dense_pe()``.
            sparse_prompt_embeddings: ``[B, N, C]``.
            dense_prompt_embeddings: ``[B, C, h, w]``.
            multimask_output: return the ``num_multimask_outputs`` ambiguity masks instead of one mask.
            repeat_image: repeat each image embedding ``B`` times along the batch (one image, many prompts).
            high_res_features: ``[[B, C/8, 4h, 4w], [B, C/4, 2h, 2w]]`` (after ``conv_s0`` / ``conv_s1``),
                required iff ``use_high_res_features``.

        Returns:
            masks ``[B, M, 4h, 4w]`` (logits), iou_pred ``[B, M]``, sam_tokens_out ``[B, T, C]`` and
            object_score_logits ``[B, 1]``, where ``M = num_multimask_outputs`` with ``multimask_output``
            else 1, and ``T = num_multimask_outputs`` with ``multimask_output`` and
            ``use_multimask_token_for_obj_ptr`` else 1 (the single-mask token).
        """
        masks, iou_pred, mask_tokens_out, object_score_logits = self.predict_masks(
            image_embeddings,
            image_pe,
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
            repeat_image=repeat_image,
            high_res_features=high_res_features,
        )

        if multimask_output:
            masks, iou_pred = masks[:, 1:], iou_pred[:, 1:]
        elif self.dynamic_multimask_via_stability and not self.training:
            masks, iou_pred = self._dynamic_multimask_via_stability(masks, iou_pred)
        else:
            masks, iou_pred = masks[:, 0:1], iou_pred[:, 0:1]

        # Only the multimask-for-pointer mode hands out the multimask tokens; otherwise the single-mask token
        # is the object pointer even when several masks were asked for, as in SAM 2's training.
        if multimask_output and self.use_multimask_token_for_obj_ptr:
            sam_tokens_out = mask_tokens_out[:, 1:]
        else:
            sam_tokens_out = mask_tokens_out[:, 0:1]
        return masks, iou_pred, sam_tokens_out, object_score_logits

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        repeat_image: bool,
        high_res_features: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """All outputs before selection: masks ``[B, K, 4h, 4w]``, iou ``[B, K]``, mask tokens ``[B, K, C]``
        and object-score logits ``[B, 1]``, with ``K = num_mask_tokens``."""
        batch = sparse_prompt_embeddings.shape[0]
        leading = [self.obj_score_token.weight] if self.pred_obj_scores else []
        iou_index = len(leading)
        output_tokens = torch.cat([*leading, self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(batch, -1, -1)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings], dim=1)

        if repeat_image:
            src = torch.repeat_interleave(image_embeddings, batch, dim=0)
        else:
            if image_embeddings.shape[0] != batch:
                raise ValueError(
                    f"{image_embeddings.shape[0]} image embeddings for {batch} prompts; "
                    "pass repeat_image=True to share one image"
                )
            src = image_embeddings
        src = src + dense_prompt_embeddings
        if image_pe.shape[0] != 1:
            raise ValueError(
                f"image_pe must have batch size 1 (from get_dense_pe()), got {image_pe.shape[0]}"
            )
        pos_src = image_pe.expand(batch, -1, -1, -1)
        b, c, h, w = src.shape

        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, iou_index]
        mask_tokens_out = hs[:, iou_index + 1 : iou_index + 1 + self.num_mask_tokens]

        # The image tokens are already channels-last; upscaling them so keeps the transposed convolutions
        # on their fast CPU path (several times faster than on an NCHW copy).
        image = src.reshape(b, h, w, c).permute(0, 3, 1, 2)
        upscaled = self._upscale(image, high_res_features)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        b, c, h, w = upscaled.shape
        pixels = upscaled.permute(0, 2, 3, 1).reshape(b, h * w, c)
        masks = (hyper_in @ pixels.transpose(1, 2)).reshape(b, -1, h, w)

        iou_pred = self.iou_prediction_head(iou_token_out)
        if self.pred_obj_scores:
            object_score_logits = self.pred_obj_score_head(hs[:, 0])
        else:
            object_score_logits = iou_pred.new_full((iou_pred.shape[0], 1), OBJECT_PRESENT_LOGIT)
        return masks, iou_pred, mask_tokens_out, object_score_logits

    def _upscale(self, src: torch.Tensor, high_res_features: list[torch.Tensor] | None) -> torch.Tensor:
        """``[B, C, h, w]`` -> ``[B, C/8, 4h, 4w]``; high-res features join before each upscaling's norm /
        activation."""
        if not self.use_high_res_features:
            return self.output_upscaling(src)
        if high_res_features is None:
            raise ValueError("this decoder uses high-resolution features; pass high_res_features")
        deconv1, norm1, act1, deconv2, act2 = self.output_upscaling
        feat_s0, feat_s1 = high_res_features
        upscaled = act1(norm1(deconv1(src) + feat_s1))
        return act2(deconv2(upscaled) + feat_s0)

    def _stability_scores(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """``[B, M, H, W]`` -> ``[B, M]``: IoU of the mask thresholded at ``+delta`` and at ``-delta``
        (1 for an empty mask)."""
        flat = mask_logits.flatten(-2)
        delta = self.dynamic_multimask_stability_delta
        inner = (flat > delta).sum(dim=-1).float()
        outer = (flat > -delta).sum(dim=-1).float()
        return torch.where(outer > 0, inner / outer, 1.0)

    def _dynamic_multimask_via_stability(
        self, all_masks: torch.Tensor, all_iou: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per prompt, keep the single-mask output if it is stable, else the multimask output with the best
        predicted IoU, so that tracking and single clicks always get a usable mask.
        ``[B, K, H, W]``, ``[B, K]`` -> ``[B, 1, H, W]``, ``[B, 1]``."""
        multi_masks, multi_iou = all_masks[:, 1:], all_iou[:, 1:]
        best = multi_iou.argmax(dim=-1)
        rows = torch.arange(multi_iou.shape[0], device=all_iou.device)
        best_masks = multi_masks[rows, best].unsqueeze(1)
        best_iou = multi_iou[rows, best].unsqueeze(1)

        single_masks, single_iou = all_masks[:, 0:1], all_iou[:, 0:1]
        is_stable = self._stability_scores(single_masks) >= self.dynamic_multimask_stability_thresh
        masks = torch.where(is_stable[..., None, None], single_masks, best_masks)
        iou = torch.where(is_stable, single_iou, best_iou)
        return masks, iou
