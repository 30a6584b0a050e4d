"""SAM 2 image encoder: Hiera trunk, FPN neck, sine position encoding."""

from __future__ import annotations

import math

import pytest
import torch

from medsam2.model.hiera import (
    Hiera,
    MultiScaleAttention,
    MultiScaleBlock,
    window_partition,
    window_unpartition,
)
from medsam2.model.image_encoder import FpnNeck, ImageEncoder
from medsam2.model.position_encoding import PositionEmbeddingSine

# Trunk arguments of the official presets (sam2-configs.md, table 1); base_plus uses the Hiera defaults.
PRESETS = {
    "t": dict(embed_dim=96, num_heads=1, stages=[1, 2, 7, 2], global_att_blocks=[5, 7, 9],
              window_pos_embed_bkg_spatial_size=[7, 7]),
    "s": dict(embed_dim=96, num_heads=1, stages=[1, 2, 11, 2], global_att_blocks=[7, 10, 13],
              window_pos_embed_bkg_spatial_size=[7, 7]),
    "b+": dict(embed_dim=112, num_heads=2),
    "l": dict(embed_dim=144, num_heads=2, stages=[2, 6, 36, 4], global_att_blocks=[23, 33, 43],
              window_pos_embed_bkg_spatial_size=[7, 7], window_spec=[8, 4, 16, 8]),
}  # fmt: skip
# Official image_encoder.* facts: key count, parameter count, blocks with a residual `proj`.
OFFICIAL_FACTS = {
    "t": (162, 27_219_136, [1, 3, 10]),
    "s": (210, 34_316_992, [1, 3, 14]),
    "b+": (306, 69_106_816, [2, 5, 21]),
    "l": (594, 212_703_280, [2, 8, 44]),
}
TINY = dict(embed_dim=8, num_heads=1, stages=[1, 2, 2, 1], global_att_blocks=[4],
            window_pos_embed_bkg_spatial_size=[3, 5], window_spec=[4, 2, 6, 3])  # fmt: skip


def build_encoder(trunk_args: dict) -> ImageEncoder:
    c = trunk_args["embed_dim"]
    neck = FpnNeck(d_model=256, backbone_channel_list=[8 * c, 4 * c, 2 * c, c], fpn_top_down_levels=[2, 3])
    return ImageEncoder(trunk=Hiera(**trunk_args), neck=neck, scalp=1).eval()


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / (p[0].numel() ** 0.5 if p.ndim > 1 else 10))


# ---------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(("trunk", "size"), [("tiny", 64), ("tiny", 160), ("t", 128)])
def test_output_structure_and_shapes(trunk: str, size: int) -> None:
    args = TINY if trunk == "tiny" else PRESETS[trunk]
    c = args["embed_dim"]
    encoder = build_encoder(args)
    randomize(encoder)
    images = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        stages = encoder.trunk(images)
        out = encoder(images)
    assert [tuple(s.shape) for s in stages] == [
        (2, c * 2**i, size // 4 // 2**i, size // 4 // 2**i) for i in range(4)
    ]
    assert set(out) == {"vision_features", "vision_pos_enc", "backbone_fpn"}
    expected = [
        (2, 256, size // 4, size // 4),
        (2, 256, size // 8, size // 8),
        (2, 256, size // 16, size // 16),
    ]
    assert [tuple(f.shape) for f in out["backbone_fpn"]] == expected
    assert [tuple(p.shape) for p in out["vision_pos_enc"]] == expected
    assert out["vision_features"] is out["backbone_fpn"][-1]
    assert all(torch.isfinite(f).all() for f in out["backbone_fpn"])
    # Different images in the batch give different features (the batch axis is not mixed up or broadcast).
    assert not torch.allclose(out["vision_features"][0], out["vision_features"][1])


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_keys_and_shapes(preset: str, sam2_keys: dict) -> None:
    # Built on the meta device: keys and shapes without allocating anything.
    with torch.device("meta"):
        encoder = build_encoder(PRESETS[preset])
    state = encoder.state_dict()
    n_keys, n_params, proj_blocks = OFFICIAL_FACTS[preset]
    assert len(state) == n_keys
    assert sum(t.numel() for t in state.values()) == n_params
    assert sorted(int(k.split(".")[2]) for k in state if k.endswith(".proj.weight") and ".blocks." in k and
                  ".attn." not in k) == proj_blocks  # fmt: skip

    presets = sam2_keys
    for version in ("sam2/sam2", "sam2.1/sam2.1"):
        reference = {
            name.removeprefix("image_encoder."): shape
            for name, shape in presets[f"configs/{version}_hiera_{preset}.yaml"]["keys"]
            if name.startswith("image_encoder.")
        }
        assert {k: list(v.shape) for k, v in state.items()} == reference


def test_window_rule_lags_by_a_block() -> None:
    trunk = Hiera(**PRESETS["t"])
    assert [b.window_size for b in trunk.blocks] == [8, 8, 4, 4, 14, 0, 14, 0, 14, 0, 14, 7]
    assert [i for i, b in enumerate(trunk.blocks) if b.q_stride is not None] == [1, 3, 10]
    assert trunk.channel_list == [768, 384, 192, 96]
    assert [b.attn.num_heads for b in trunk.blocks] == [1, 2, 2, 4, 4, 4, 4, 4, 4, 4, 8, 8]


def test_invalid_configs_are_rejected() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        Hiera(embed_dim=8, stages=[1, 1, 1, 1], window_spec=[4, 4, 4])
    with pytest.raises(ValueError, match="must divide its window"):
        Hiera(embed_dim=8, stages=[1, 1, 1, 1], window_spec=[3, 4, 4, 4], global_att_blocks=[])
    neck = FpnNeck(d_model=32, backbone_channel_list=[64, 32, 16, 8])
    with pytest.raises(ValueError, match="do not match"):
        ImageEncoder(Hiera(embed_dim=16, stages=[1, 1, 1, 1], window_spec=[4, 4, 4, 4]), neck)


# ---------------------------------------------------------------------------------------------- properties


def test_window_partition_round_trip_with_padding() -> None:
    x = torch.randn(2, 10, 13, 3)
    windows, grid = window_partition(x, 4)
    assert grid == (3, 4) and windows.shape == (2 * 12, 4, 4, 3)
    # Window (row 1, col 2) of image 1 holds rows 4..7 and columns 8..11.
    assert torch.equal(windows[12 + 1 * 4 + 2], x[1, 4:8, 8:12])
    # The padding is zeros and sits at the bottom/right.
    assert torch.equal(windows[12 + 2 * 4 + 3, 2:], torch.zeros(2, 4, 3))
    assert torch.equal(window_unpartition(windows, grid, (10, 13)), x)


@pytest.mark.parametrize("q_stride", [None, (2, 2)])
def test_window_covering_the_map_equals_global_attention(q_stride: tuple[int, int] | None) -> None:
    torch.manual_seed(0)
    dim_out = 16 if q_stride else 8
    windowed = MultiScaleBlock(8, dim_out, num_heads=2, window_size=6, q_stride=q_stride)
    global_ = MultiScaleBlock(8, dim_out, num_heads=2, window_size=0, q_stride=q_stride)
    randomize(windowed)
    global_.load_state_dict(windowed.state_dict())
    x = torch.randn(1, 6, 6, 8)
    torch.testing.assert_close(windowed(x), global_(x), rtol=1e-5, atol=1e-5)
    # A window larger than the map is not the same: like the official model, the zero padding is not masked
    # and takes part in attention as extra keys.
    padded = MultiScaleBlock(8, dim_out, num_heads=2, window_size=8, q_stride=q_stride)
    padded.load_state_dict(windowed.state_dict())
    assert not torch.allclose(padded(x), global_(x), atol=1e-3)


def test_pooled_attention_matches_explicit_softmax() -> None:
    # The checkpoint's qkv rows are [q | k | v], each split head-major; pooled queries are 2x2 maxima.
    torch.manual_seed(0)
    heads, dim, dim_out = 2, 6, 8
    attn = MultiScaleAttention(dim, dim_out, heads, q_stride=(2, 2))
    randomize(attn)
    x = torch.randn(1, 4, 6, dim)
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(dim_out, dim=-1)
    corners = (q[:, 0::2, 0::2], q[:, 0::2, 1::2], q[:, 1::2, 0::2], q[:, 1::2, 1::2])
    q = torch.stack(corners).amax(0)
    q, k, v = (t.reshape(-1, heads, dim_out // heads) for t in (q, k, v))  # [tokens, heads, head_dim]
    weights = torch.softmax(torch.einsum("qhc,khc->hqk", q, k) / (dim_out // heads) ** 0.5, dim=-1)
    mixed = torch.einsum("hqk,khc->qhc", weights, v).reshape(1, 2, 3, dim_out)
    torch.testing.assert_close(attn(x), attn.proj(mixed), rtol=1e-5, atol=1e-5)


def test_residual_path_of_blocks() -> None:
    torch.manual_seed(0)
    plain = MultiScaleBlock(8, 8, num_heads=2, window_size=4)
    transition = MultiScaleBlock(8, 16, num_heads=2, window_size=4, q_stride=(2, 2))
    for block in (plain, transition):
        randomize(block)
        with torch.no_grad():  # silence the attention and MLP branches, leaving the residual
            for layer in (block.attn.proj, block.mlp.layers[1]):
                layer.weight.zero_()
                layer.bias.zero_()
    x = torch.randn(2, 8, 12, 8)
    # Inside a stage the residual is the raw input, not the normalized one.
    torch.testing.assert_close(plain(x), x)
    # At a stage transition it is the projected, normalized input, max-pooled.
    expected = torch.nn.functional.max_pool2d(
        transition.proj(transition.norm1(x)).permute(0, 3, 1, 2), kernel_size=2
    ).permute(0, 2, 3, 1)
    torch.testing.assert_close(transition(x), expected)


def test_windowed_block_keeps_changes_inside_their_window() -> None:
    torch.manual_seed(0)
    block = MultiScaleBlock(8, 8, num_heads=2, window_size=4)
    randomize(block)
    x = torch.randn(1, 8, 12, 8)
    y = x.clone()
    # A token in the window of rows 4..7, columns 4..7; not by a constant, which norm1 would remove.
    y[0, 5, 6] += torch.randn(8)
    changed = (block(x) - block(y)).abs().amax(-1)[0] > 1e-6
    inside = torch.zeros(8, 12, dtype=torch.bool)
    inside[4:8, 4:8] = True
    assert changed[inside].sum() == 16 and not changed[~inside].any()
    # Global attention spreads the change everywhere.
    block.window_size = 0
    assert ((block(x) - block(y)).abs().amax(-1) > 1e-6).all()


def test_position_embedding_tiles_the_window_embedding() -> None:
    trunk = Hiera(**TINY)
    with torch.no_grad():
        trunk.pos_embed.zero_()
        trunk.pos_embed_window.copy_(torch.randn_like(trunk.pos_embed_window))
    pos = trunk._position_embedding((10, 7))  # not a whole number of 4x4 windows
    window = trunk.pos_embed_window[0].permute(1, 2, 0)
    assert pos.shape == (1, 10, 7, 8)
    for r in range(10):
        for c in range(7):
            assert torch.equal(pos[0, r, c], window[r % 4, c % 4])


def test_fpn_top_down_only_on_listed_levels() -> None:
    torch.manual_seed(0)
    neck = FpnNeck(d_model=4, backbone_channel_list=[16, 8, 4, 2], fpn_top_down_levels=[2, 3])
    randomize(neck)
    xs = [torch.randn(1, 2 * 2**i, 16 // 2**i, 16 // 2**i) for i in range(4)]
    with torch.no_grad():
        features, pos = neck(xs)
        lateral = [neck.convs[3 - i](x) for i, x in enumerate(xs)]
    torch.testing.assert_close(features[3], lateral[3])
    up = features[3].repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    torch.testing.assert_close(features[2], lateral[2] + up)
    # Levels 0 and 1 get no top-down signal.
    torch.testing.assert_close(features[1], lateral[1])
    torch.testing.assert_close(features[0], lateral[0])
    assert [tuple(p.shape) for p in pos] == [tuple(f.shape) for f in features]


def test_sine_encoding_matches_formula() -> None:
    pe = PositionEmbeddingSine(num_pos_feats=8)
    pos = pe(torch.zeros(2, 3, 4, 5))
    assert pos.shape == (2, 8, 4, 5)
    for r, c in [(0, 0), (3, 4), (2, 1)]:
        y, x = (r + 1) / (4 + 1e-6) * 2 * math.pi, (c + 1) / (5 + 1e-6) * 2 * math.pi
        expected = []
        for t in (y, x):
            for pair in range(2):
                angle = t / 10000 ** (2 * pair / 4)
                expected += [math.sin(angle), math.cos(angle)]
        torch.testing.assert_close(pos[1, :, r, c], torch.tensor(expected), rtol=1e-5, atol=1e-6)
    # The cache is keyed by dtype too.
    assert pe(torch.zeros(1, 3, 4, 5, dtype=torch.float64)).dtype == torch.float64


def test_sine_cache_filled_in_inference_mode_works_with_autograd() -> None:
    pe = PositionEmbeddingSine(num_pos_feats=8)
    x = torch.zeros(1, 8, 3, 3)
    with torch.inference_mode():
        pe(x)
    weight = torch.ones(3, 3, requires_grad=True)
    (pe(x) @ weight).sum().backward()  # matmul saves its inputs for backward
    assert weight.grad is not None
