"""Assemble a :class:`SAM2Model` from a :class:`~medsam2.configs.ModelConfig`."""

from __future__ import annotations

from torch import nn

from ..configs import ModelConfig
from .hiera import Hiera
from .image_encoder import FpnNeck, ImageEncoder
from .mask_decoder import MaskDecoder
from .memory_attention import MemoryAttention, MemoryAttentionLayer, RoPEAttention
from .memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder
from .position_encoding import PositionEmbeddingSine
from .prompt_encoder import PromptEncoder
from .sam2 import SAM2Model
from .two_way_transformer import TwoWayTransformer


def build_model(config: ModelConfig) -> SAM2Model:
    """A randomly initialised model in eval mode."""
    model = SAM2Model(
        config,
        image_encoder=_image_encoder(config),
        memory_attention=_memory_attention(config),
        memory_encoder=_memory_encoder(config),
        prompt_encoder=PromptEncoder(
            embed_dim=config.hidden_dim,
            image_embedding_size=config.image_embedding_size,
            input_image_size=config.image_size,
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=config.hidden_dim,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=config.hidden_dim,
                num_heads=config.decoder_num_heads,
                mlp_dim=config.decoder_mlp_dim,
            ),
            num_multimask_outputs=3,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
            use_high_res_features=config.use_high_res_features,
            iou_prediction_use_sigmoid=config.iou_prediction_use_sigmoid,
            dynamic_multimask_via_stability=True,
            dynamic_multimask_stability_delta=config.dynamic_multimask_stability_delta,
            dynamic_multimask_stability_thresh=config.dynamic_multimask_stability_thresh,
            pred_obj_scores=config.pred_obj_scores,
            pred_obj_scores_mlp=config.pred_obj_scores,
            use_multimask_token_for_obj_ptr=True,
        ),
    )
    return model.eval()


def _image_encoder(config: ModelConfig) -> nn.Module:
    if config.image_encoder == "tinyvit":
        from .lite_encoder import LiteImageEncoder

        return LiteImageEncoder(config.hidden_dim)
    if config.image_encoder != "hiera":
        raise ValueError(f"Unknown image encoder {config.image_encoder!r} (expected 'hiera' or 'tinyvit')")
    trunk = Hiera(
        embed_dim=config.hiera_embed_dim,
        num_heads=config.hiera_num_heads,
        stages=config.hiera_stages,
        global_att_blocks=config.hiera_global_att_blocks,
        window_pos_embed_bkg_spatial_size=config.hiera_window_pos_embed_bkg_spatial_size,
        window_spec=config.hiera_window_spec,
    )
    neck = FpnNeck(
        d_model=config.hidden_dim,
        backbone_channel_list=list(config.backbone_channel_list),
        fpn_top_down_levels=list(config.fpn_top_down_levels),
        position_encoding=PositionEmbeddingSine(config.hidden_dim),
    )
    return ImageEncoder(trunk=trunk, neck=neck, scalp=1)


def _memory_attention(config: ModelConfig) -> MemoryAttention:
    def attention(kv_in_dim: int | None) -> RoPEAttention:
        return RoPEAttention(
            embedding_dim=config.hidden_dim,
            num_heads=config.memory_attention_heads,
            downsample_rate=config.memory_attention_downsample_rate,
            dropout=config.memory_attention_dropout,
            kv_in_dim=kv_in_dim,
            rope_theta=config.rope_theta,
            rope_k_repeat=kv_in_dim is not None,
        )

    layer = MemoryAttentionLayer(
        self_attention=attention(None),
        cross_attention=attention(config.mem_dim),
        d_model=config.hidden_dim,
        dim_feedforward=config.memory_attention_feedforward,
        dropout=config.memory_attention_dropout,
    )
    return MemoryAttention(
        d_model=config.hidden_dim,
        pos_enc_at_input=True,
        layer=layer,
        num_layers=config.memory_attention_layers,
    )


def _memory_encoder(config: ModelConfig) -> MemoryEncoder:
    return MemoryEncoder(
        out_dim=config.mem_dim,
        mask_downsampler=MaskDownSampler(
            embed_dim=config.hidden_dim,
            kernel_size=3,
            stride=2,
            padding=1,
            total_stride=config.backbone_stride,
        ),
        fuser=Fuser(
            CXBlock(dim=config.hidden_dim, kernel_size=7, padding=3), num_layers=config.memory_fuser_layers
        ),
        position_encoding=PositionEmbeddingSine(config.mem_dim),
        in_dim=config.hidden_dim,
    )
