"""Model hyperparameters and the official presets.

Every value that differs between the published SAM 2 / SAM 2.1 / MedSAM2 models is a field of
``ModelConfig``; behaviour that all of them share (mask input used as output on mask-prompted frames, the
no-memory embedding added directly on the first conditioning frame, object pointers from the multimask
token through a 3-layer MLP, pointers only from the past at inference, ...) is fixed in the model code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import MedSAM2Error

# Per-size Hiera settings of the official configs (reference/sam2-configs.md, table 1).
_HIERA_SIZES: dict[str, dict] = {
    "t": dict(
        hiera_embed_dim=96,
        hiera_num_heads=1,
        hiera_stages=(1, 2, 7, 2),
        hiera_global_att_blocks=(5, 7, 9),
        hiera_window_pos_embed_bkg_spatial_size=(7, 7),
        hiera_window_spec=(8, 4, 14, 7),
    ),
    "s": dict(
        hiera_embed_dim=96,
        hiera_num_heads=1,
        hiera_stages=(1, 2, 11, 2),
        hiera_global_att_blocks=(7, 10, 13),
        hiera_window_pos_embed_bkg_spatial_size=(7, 7),
        hiera_window_spec=(8, 4, 14, 7),
    ),
    "b+": dict(
        hiera_embed_dim=112,
        hiera_num_heads=2,
        hiera_stages=(2, 3, 16, 3),
        hiera_global_att_blocks=(12, 16, 20),
        hiera_window_pos_embed_bkg_spatial_size=(14, 14),
        hiera_window_spec=(8, 4, 14, 7),
    ),
    "l": dict(
        hiera_embed_dim=144,
        hiera_num_heads=2,
        hiera_stages=(2, 6, 36, 4),
        hiera_global_att_blocks=(23, 33, 43),
        hiera_window_pos_embed_bkg_spatial_size=(7, 7),
        hiera_window_spec=(8, 4, 16, 8),
    ),
}

# SAM 2.1 adds the spatial no-object embedding and a signed, projected temporal encoding of object pointers.
_SAM21_FLAGS = dict(no_obj_embed_spatial=True, proj_tpos_enc_in_obj_ptrs=True, add_tpos_enc_to_obj_ptrs=True)
_SAM20_FLAGS = dict(
    no_obj_embed_spatial=False, proj_tpos_enc_in_obj_ptrs=False, add_tpos_enc_to_obj_ptrs=False
)


@dataclass(frozen=True)
class ModelConfig:
    """All hyperparameters of a SAM 2 family model.

    The defaults are those of ``sam2.1_hiera_t`` at 1024 px; use :meth:`preset` for a published model and
    ``dataclasses.replace`` (or the constructor) for anything else, such as a tiny test model.
    """

    name: str = "custom"
    image_size: int = 1024

    # Image encoder: "hiera" (SAM 2) or "tinyvit" (LiteMedSAM's encoder, one 64x64 level at 256 px).
    image_encoder: str = "hiera"
    hiera_embed_dim: int = 96
    hiera_num_heads: int = 1
    hiera_stages: tuple[int, ...] = (1, 2, 7, 2)
    hiera_global_att_blocks: tuple[int, ...] = (5, 7, 9)
    hiera_window_pos_embed_bkg_spatial_size: tuple[int, int] = (7, 7)
    hiera_window_spec: tuple[int, ...] = (8, 4, 14, 7)
    fpn_top_down_levels: tuple[int, ...] = (2, 3)
    backbone_stride: int = 16
    hidden_dim: int = 256

    # Input conventions. SAM 2: stretch to S x S, ImageNet statistics, a padding token after every prompt.
    # LiteMedSAM: longest side to S and zero padding, per-image min-max to [0, 1], a box as two tokens only.
    input_resize: str = "stretch"
    input_normalization: str = "imagenet"
    box_padding_token: bool = True

    # SAM heads.
    use_high_res_features: bool = True
    iou_prediction_use_sigmoid: bool = True
    pred_obj_scores: bool = True
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    dynamic_multimask_stability_delta: float = 0.05
    dynamic_multimask_stability_thresh: float = 0.98

    # Memory.
    num_maskmem: int = 7
    mem_dim: int = 64
    memory_attention_layers: int = 4
    memory_attention_heads: int = 1
    memory_attention_feedforward: int = 2048
    memory_attention_dropout: float = 0.1
    # Queries, keys and values of the memory attention are projected to hidden_dim / this rate (1 in SAM 2).
    memory_attention_downsample_rate: int = 1
    rope_theta: float = 10000.0
    # Memory attention on average-pooled maps (p x p cells), its change upsampled onto the embedding (1: SAM 2).
    memory_attention_pool: int = 1
    memory_fuser_layers: int = 2
    sigmoid_scale_for_mem_enc: float = 20.0
    sigmoid_bias_for_mem_enc: float = -10.0
    max_obj_ptrs_in_encoder: int = 16
    # Tracked slices prompted with the box of the previous slice's mask, grown on each side by this fraction
    # of its longer side (at least 2 px); None: SAM 2's prompt-free tracking. For a decoder trained on boxes.
    tracking_box_margin: float | None = None
    # A presence head (medsam2.model.presence) judges each tracked frame's region against the prompted ones.
    presence_head: bool = False
    # With a presence head: a tracked mask keeps only the pixels whose intensity lies within this many robust
    # spreads of the median under a prompted mask (medsam2.model.presence.typical_cells); None: keeps all.
    typical_intensity_spreads: float | None = None
    # The user's box or positive click on a frame says the object is there: the object score cannot blank
    # that frame's answer (False: SAM 2, where the score decides on prompted frames too).
    prompts_assert_presence: bool = False

    # SAM 2.1 additions.
    no_obj_embed_spatial: bool = True
    add_tpos_enc_to_obj_ptrs: bool = True
    proj_tpos_enc_in_obj_ptrs: bool = True

    @property
    def version(self) -> str:
        """``"2.1"`` when the SAM 2.1 additions are on, else ``"2.0"``."""
        return "2.1" if self.no_obj_embed_spatial else "2.0"

    @property
    def backbone_channel_list(self) -> tuple[int, ...]:
        """Hiera stage widths, lowest resolution first, as the FPN neck takes them."""
        return tuple(self.hiera_embed_dim * 2**i for i in reversed(range(len(self.hiera_stages))))

    @property
    def image_embedding_size(self) -> int:
        """Side of the lowest-resolution feature map that memory attention and the decoder work on."""
        return self.image_size // self.backbone_stride

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, image_size: int | None = None) -> ModelConfig:
        """A published configuration by name, e.g. ``"sam2.1_hiera_t"``; ``image_size`` overrides 1024."""
        builder = PRESETS.get(name)
        if builder is None:
            raise MedSAM2Error(f"Unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
        config = builder()
        if image_size is not None:
            config = config.with_image_size(image_size)
        return config

    def with_image_size(self, image_size: int) -> ModelConfig:
        """The same model run at another input size (state-dict shapes do not depend on it)."""
        if image_size % (self.backbone_stride * 2) or image_size <= 0:
            raise MedSAM2Error(
                f"image_size {image_size} must be a positive multiple of {self.backbone_stride * 2} "
                f"for {self.name}"
            )
        return self.replace(image_size=image_size)


def _official(version: str, size: str) -> ModelConfig:
    flags = _SAM21_FLAGS if version == "2.1" else _SAM20_FLAGS
    prefix = "sam2.1" if version == "2.1" else "sam2"
    return ModelConfig(name=f"{prefix}_hiera_{size}", **_HIERA_SIZES[size], **flags)


def _medsam2_lite() -> ModelConfig:
    # LiteMedSAM's TinyViT gives a single 64x64 map at 256 px (stride 4) and no multi-level features; its
    # decoder is SAM's (IoU regressed without a sigmoid). The memory side is sized for CPU training and
    # inference: memory attention runs on 4x4-pooled maps (16 x 16 = 256 tokens per frame instead of 4096,
    # its change upsampled onto the full embedding), two layers instead of SAM 2's four, attention projected
    # to 256 / 2 = 128 channels (one head), a 1024-wide feedforward, and one fuser block in the memory
    # encoder. Memory attention then costs ~0.3 GMAC per frame with 6 memories (SAM 2's layout here: ~100).
    # LiteMedSAM's decoder only ever saw box prompts, so a tracked slice keeps getting one: the box of the
    # previous slice's mask, 5 % larger on each side; memory and the object score decide what is kept and
    # when the object has ended (LiteMedSAM alone runs past the ends, DESIGN.md section 4). The object-score
    # head is ours, not LiteMedSAM's, and trained on few objects; a clinician's box keeps LiteMedSAM's answer.
    return ModelConfig(
        name="medsam2_lite",
        image_size=256,
        image_encoder="tinyvit",
        backbone_stride=4,
        input_resize="longest_side",
        input_normalization="minmax",
        box_padding_token=False,
        use_high_res_features=False,
        iou_prediction_use_sigmoid=False,
        memory_attention_layers=2,
        memory_attention_feedforward=1024,
        memory_attention_downsample_rate=2,
        memory_attention_pool=4,
        memory_fuser_layers=1,
        tracking_box_margin=0.05,
        presence_head=True,
        typical_intensity_spreads=4.0,
        prompts_assert_presence=True,
        **_SAM21_FLAGS,
    )


PRESETS = {
    **{f"sam2_hiera_{s}": (lambda s=s: _official("2.0", s)) for s in _HIERA_SIZES},
    **{f"sam2.1_hiera_{s}": (lambda s=s: _official("2.1", s)) for s in _HIERA_SIZES},
    "medsam2_lite": _medsam2_lite,
}
