"""SAM heads: prompt encoder, two-way transformer and mask decoder (parity with the official code is checked
by scripts/oracle/check_sam_heads.py; here: shapes, checkpoint keys and behaviour)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from medsam2.errors import InputError
from medsam2.model.mask_decoder import MaskDecoder
from medsam2.model.prompt_encoder import PromptEncoder
from medsam2.model.two_way_transformer import TwoWayTransformer

REPO = Path(__file__).resolve().parents[1]

# Official SAM 2 / 2.1 heads (identical in every preset): key count and parameter count per state-dict prefix.
OFFICIAL_PROMPT_ENCODER = (17, 6_476)
OFFICIAL_MASK_DECODER = (131, 4_215_109)
# Keys that the original SAM / LiteMedSAM decoder lacks (no high-res features, no object score).
SAM2_ONLY_DECODER_KEYS = {"conv_s0", "conv_s1", "obj_score_token", "pred_obj_score_head"}

SAM2_DECODER_FLAGS = dict(
    use_high_res_features=True,
    iou_prediction_use_sigmoid=True,
    dynamic_multimask_via_stability=True,
    dynamic_multimask_stability_delta=0.05,
    dynamic_multimask_stability_thresh=0.98,
    pred_obj_scores=True,
    pred_obj_scores_mlp=True,
    use_multimask_token_for_obj_ptr=True,
)


def _sam2_heads() -> tuple[PromptEncoder, MaskDecoder]:
    prompt_encoder = PromptEncoder(256, (64, 64), (1024, 1024), mask_in_chans=16)
    transformer = TwoWayTransformer(depth=2, embedding_dim=256, num_heads=8, mlp_dim=2048)
    return prompt_encoder, MaskDecoder(256, transformer, **SAM2_DECODER_FLAGS)


def _tiny_heads(sam2_flags: bool = True, dim: int = 32, grid: int = 4) -> tuple[PromptEncoder, MaskDecoder]:
    """Width 32, a 64-px input with a 4x4 embedding (16x16 low-res masks)."""
    prompt_encoder = PromptEncoder(dim, grid, 16 * grid, mask_in_chans=8)
    transformer = TwoWayTransformer(depth=2, embedding_dim=dim, num_heads=2, mlp_dim=64)
    flags = SAM2_DECODER_FLAGS if sam2_flags else {}
    decoder = MaskDecoder(dim, transformer, iou_head_hidden_dim=dim, **flags)
    return prompt_encoder.eval(), decoder.eval()


def _keys_and_shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


# --- checkpoint layout -------------------------------------------------------------------------------------


def test_sam2_heads_have_official_key_and_parameter_counts():
    prompt_encoder, decoder = _sam2_heads()
    for module, (n_keys, n_params) in (
        (prompt_encoder, OFFICIAL_PROMPT_ENCODER),
        (decoder, OFFICIAL_MASK_DECODER),
    ):
        state = module.state_dict()
        assert len(state) == n_keys
        assert sum(t.numel() for t in state.values()) == n_params


@pytest.mark.parametrize("preset", ["configs/sam2/sam2_hiera_t.yaml", "configs/sam2.1/sam2.1_hiera_l.yaml"])
def test_sam2_heads_match_official_keys_and_shapes(preset, sam2_keys):
    official = dict(sam2_keys[preset]["keys"])
    prompt_encoder, decoder = _sam2_heads()
    for module, prefix in ((prompt_encoder, "sam_prompt_encoder."), (decoder, "sam_mask_decoder.")):
        expected = {k[len(prefix) :]: shape for k, shape in official.items() if k.startswith(prefix)}
        assert _keys_and_shapes(module) == expected


def test_sam_decoder_variant_drops_exactly_the_sam2_only_keys():
    _, sam2_decoder = _sam2_heads()
    sam_decoder = MaskDecoder(256, TwoWayTransformer(depth=2, embedding_dim=256, num_heads=8, mlp_dim=2048))
    sam2_keys, sam_keys = set(sam2_decoder.state_dict()), set(sam_decoder.state_dict())
    assert sam_keys < sam2_keys
    assert {k.split(".")[0] for k in sam2_keys - sam_keys} == SAM2_ONLY_DECODER_KEYS
    assert len(sam_keys) == 120  # LiteMedSAM's mask_decoder.* key count


# --- prompt encoder ----------------------------------------------------------------------------------------


def test_prompt_encoder_token_counts_and_dense_shapes():
    prompt_encoder, _ = _tiny_heads()
    coords = torch.rand(2, 3, 2) * 64
    labels = torch.tensor([[1, 0, 1], [1, 1, 0]])
    box = torch.tensor([[4.0, 5.0, 40.0, 50.0], [1.0, 2.0, 30.0, 20.0]])
    mask = torch.randn(2, 1, 16, 16)

    sparse, dense = prompt_encoder((coords, labels), None, None)
    assert sparse.shape == (2, 4, 32)  # 3 clicks + the padding token
    assert dense.shape == (2, 32, 4, 4)
    sparse, _ = prompt_encoder((coords, labels), box, None)
    assert sparse.shape == (2, 5, 32)  # no padding when a box is given
    sparse, dense = prompt_encoder(None, None, mask)
    assert sparse.shape == (2, 0, 32) and dense.shape == (2, 32, 4, 4)
    sparse, dense = prompt_encoder(None, None, None)
    assert sparse.shape == (1, 0, 32) and dense.shape == (1, 32, 4, 4)
    assert prompt_encoder.get_dense_pe().shape == (1, 32, 4, 4)


def test_padding_and_labels_select_the_right_embeddings():
    prompt_encoder, _ = _tiny_heads()
    with torch.no_grad():
        for p in prompt_encoder.parameters():
            p.normal_()
    type_embeddings = [e.weight[0] for e in prompt_encoder.point_embeddings]
    coords = torch.tensor([[[10.0, 20.0], [10.0, 20.0], [10.0, 20.0], [33.0, 7.0]]])
    labels = torch.tensor([[1, 0, 2, -1]])
    sparse, _ = prompt_encoder((coords, labels), None, None)

    not_a_point = prompt_encoder.not_a_point_embed.weight[0]
    # Padding tokens ignore their coordinates: the given -1 point and the appended one are identical.
    torch.testing.assert_close(sparse[0, 3], not_a_point)
    torch.testing.assert_close(sparse[0, 4], not_a_point)
    # Same position, different label: the tokens differ exactly by the label embeddings.
    torch.testing.assert_close(sparse[0, 0] - sparse[0, 1], type_embeddings[1] - type_embeddings[0])
    torch.testing.assert_close(sparse[0, 2] - sparse[0, 1], type_embeddings[2] - type_embeddings[0])


def test_point_encoding_is_fourier_features_of_pixel_centres():
    prompt_encoder, _ = _tiny_heads()
    gaussian = prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    x, y = 10.0, 50.0
    sparse, _ = prompt_encoder((torch.tensor([[[x, y]]]), torch.tensor([[1]])), None, None)
    unit = torch.tensor([(x + 0.5) / 64, (y + 0.5) / 64])  # x first, pixel centre, divided by the input size
    angles = 2 * math.pi * ((2 * unit - 1) @ gaussian)
    expected = torch.cat([angles.sin(), angles.cos()]) + prompt_encoder.point_embeddings[1].weight[0]
    torch.testing.assert_close(sparse[0, 0], expected)


def test_dense_pe_equals_point_pe_at_embedding_cell_centres():
    prompt_encoder, _ = _tiny_heads()
    dense_pe = prompt_encoder.get_dense_pe()[0]  # [C, 4, 4], each cell covers 16x16 input pixels
    row, col = 1, 3
    # The centre of cell (row, col) is input pixel (col + 0.5) * 16 - 0.5 once the half-pixel shift is added.
    point = torch.tensor([[[(col + 0.5) * 16 - 0.5, (row + 0.5) * 16 - 0.5]]])
    sparse, _ = prompt_encoder((point, torch.tensor([[1]])), None, None)
    point_pe = sparse[0, 0] - prompt_encoder.point_embeddings[1].weight[0]
    torch.testing.assert_close(point_pe, dense_pe[:, row, col])


def test_box_argument_equals_corner_points():
    prompt_encoder, _ = _tiny_heads()
    box = torch.tensor([[4.0, 5.0, 40.0, 50.0]])
    from_box, _ = prompt_encoder(None, box, None)
    from_points, _ = prompt_encoder((box.reshape(1, 2, 2), torch.tensor([[2, 3]])), None, None)
    torch.testing.assert_close(from_box, from_points[:, :2])


def test_mask_prompt_is_downscaled_and_checked():
    prompt_encoder, _ = _tiny_heads()
    mask = torch.randn(1, 1, 16, 16)
    _, dense = prompt_encoder(None, None, mask)
    _, dense_other = prompt_encoder(None, None, -mask)
    assert not torch.allclose(dense, dense_other)
    with pytest.raises(InputError, match=r"\[B, 1, 16, 16\]"):
        prompt_encoder(None, None, torch.randn(1, 1, 32, 32))


# --- mask decoder ------------------------------------------------------------------------------------------


def _decode(prompt_encoder, decoder, batch=2, multimask=False, repeat_image=False, high_res=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    coords = torch.rand(batch, 2, 2, generator=g) * 64
    sparse, dense = prompt_encoder((coords, torch.ones(batch, 2, dtype=torch.int)), None, None)
    image = torch.randn(1 if repeat_image else batch, 32, 4, 4, generator=g)
    features = [torch.randn(batch, 4, 16, 16, generator=g), torch.randn(batch, 8, 8, 8, generator=g)]
    return decoder(
        image,
        prompt_encoder.get_dense_pe(),
        sparse,
        dense,
        multimask_output=multimask,
        repeat_image=repeat_image,
        high_res_features=features if high_res else None,
    )


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("repeat_image", [False, True])
def test_decoder_output_shapes(multimask, repeat_image):
    prompt_encoder, decoder = _tiny_heads()
    with torch.no_grad():
        masks, iou, tokens, object_score = _decode(
            prompt_encoder, decoder, multimask=multimask, repeat_image=repeat_image
        )
    outputs = 3 if multimask else 1
    assert masks.shape == (2, outputs, 16, 16)
    assert iou.shape == (2, outputs)
    assert tokens.shape == (2, outputs, 32)  # use_multimask_token_for_obj_ptr is on
    assert object_score.shape == (2, 1)
    assert ((iou >= 0) & (iou <= 1)).all()  # sigmoid IoU


def test_repeat_image_equals_explicit_repetition():
    prompt_encoder, decoder = _tiny_heads()
    g = torch.Generator().manual_seed(1)
    sparse, dense = prompt_encoder((torch.rand(3, 1, 2, generator=g) * 64, torch.ones(3, 1)), None, None)
    image = torch.randn(1, 32, 4, 4, generator=g)
    features = [torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 8, 8, 8, generator=g)]
    pe = prompt_encoder.get_dense_pe()
    with torch.no_grad():
        shared = decoder(image, pe, sparse, dense, True, True, features)
        repeated = decoder(image.expand(3, -1, -1, -1), pe, sparse, dense, True, False, features)
    for a, b in zip(shared, repeated, strict=True):
        torch.testing.assert_close(a, b)


def test_sam_variant_reports_a_present_object_and_single_mask_token():
    prompt_encoder, decoder = _tiny_heads(sam2_flags=False)
    assert not hasattr(decoder, "pred_obj_score_head")
    with torch.no_grad():
        masks, iou, tokens, object_score = _decode(prompt_encoder, decoder, multimask=True, high_res=False)
    assert masks.shape == (2, 3, 16, 16) and iou.shape == (2, 3)
    assert tokens.shape == (2, 1, 32)  # the single-mask token is the object pointer
    torch.testing.assert_close(object_score, torch.full((2, 1), 10.0))


def test_high_res_features_are_used():
    prompt_encoder, decoder = _tiny_heads()
    g = torch.Generator().manual_seed(2)
    sparse, dense = prompt_encoder((torch.rand(1, 1, 2, generator=g) * 64, torch.ones(1, 1)), None, None)
    image = torch.randn(1, 32, 4, 4, generator=g)
    features = [torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 8, 8, 8, generator=g)]
    pe = prompt_encoder.get_dense_pe()
    with torch.no_grad():
        masks = decoder(image, pe, sparse, dense, True, False, features)[0]
        for level in range(2):
            # Random, not constant: a constant shift of the stride-8 features is removed by the LayerNorm.
            changed = [
                f + torch.randn(f.shape, generator=g) if i == level else f for i, f in enumerate(features)
            ]
            assert not torch.allclose(masks, decoder(image, pe, sparse, dense, True, False, changed)[0])
    with pytest.raises(ValueError, match="high_res_features"):
        decoder(image, prompt_encoder.get_dense_pe(), sparse, dense, True, False, None)


# --- dynamic multimask selection ---------------------------------------------------------------------------


def _constant_logit_decoder(single_mask_logit: float, multimask_logits: tuple[float, float, float], ious):
    """A tiny SAM-variant decoder whose mask k is the constant ``logits[k]`` everywhere and whose IoU
    predictions are ``ious``: the upscaled embedding is made GELU(1) on every channel and pixel, and each
    hypernetwork outputs a constant vector."""
    prompt_encoder, decoder = _tiny_heads(sam2_flags=False)
    decoder.dynamic_multimask_via_stability = True
    upscale_value = F.gelu(torch.tensor(1.0)).item()
    channels = decoder.output_upscaling[3].out_channels
    with torch.no_grad():
        decoder.output_upscaling[3].weight.zero_()
        decoder.output_upscaling[3].bias.fill_(1.0)
        for mlp, logit in zip(
            decoder.output_hypernetworks_mlps, (single_mask_logit, *multimask_logits), strict=True
        ):
            mlp.layers[-1].weight.zero_()
            mlp.layers[-1].bias.fill_(logit / (channels * upscale_value))
        decoder.iou_prediction_head.layers[-1].weight.zero_()
        decoder.iou_prediction_head.layers[-1].bias.copy_(torch.tensor(ious))
    return prompt_encoder, decoder


@pytest.mark.parametrize(
    ("single_logit", "falls_back"),
    [
        (0.0, True),  # every pixel within ±delta of zero: stability 0
        (0.03, True),  # still inside the band: nothing above +delta
        (2.0, False),  # confidently foreground everywhere: stability 1
        (-2.0, False),  # confidently empty: an empty mask counts as stable
    ],
)
def test_unstable_single_mask_falls_back_to_best_multimask(single_logit, falls_back):
    ious = [0.5, 0.1, 0.9, 0.3]  # best multimask output is token 2 (second of the three)
    prompt_encoder, decoder = _constant_logit_decoder(single_logit, (-1.0, 3.0, 5.0), ious)
    with torch.no_grad():
        masks, iou, _, _ = _decode(prompt_encoder, decoder, high_res=False)
    expected_logit, expected_iou = (3.0, 0.9) if falls_back else (single_logit, 0.5)
    torch.testing.assert_close(masks, torch.full((2, 1, 16, 16), expected_logit), atol=1e-4, rtol=0)
    torch.testing.assert_close(iou, torch.full((2, 1), expected_iou))


def test_stability_fallback_only_at_eval_with_one_mask():
    prompt_encoder, decoder = _constant_logit_decoder(0.0, (-1.0, 3.0, 5.0), [0.5, 0.1, 0.9, 0.3])
    with torch.no_grad():
        multimask, *_ = _decode(prompt_encoder, decoder, multimask=True, high_res=False)
        decoder.train()
        single_in_training, *_ = _decode(prompt_encoder, decoder, high_res=False)
    expected = torch.tensor([-1.0, 3.0, 5.0]).reshape(1, 3, 1, 1).expand(2, 3, 16, 16)
    torch.testing.assert_close(multimask, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(single_in_training, torch.zeros(2, 1, 16, 16), atol=1e-4, rtol=0)
