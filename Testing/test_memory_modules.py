"""Memory attention (with axial RoPE) and memory encoder (parity with the official code is checked by
scripts/oracle/check_memory_modules.py; here: checkpoint keys, shapes and behaviour on small configs)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from medsam2.model.memory_attention import MemoryAttention, MemoryAttentionLayer, RoPEAttention
from medsam2.model.memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder
from medsam2.model.position_encoding import PositionEmbeddingSine
from medsam2.model.rope import AxialRoPE, axial_rope_angles

REPO = Path(__file__).resolve().parents[1]

# Official SAM 2 / 2.1 (identical in every preset): key count and parameter count per state-dict prefix.
OFFICIAL_MEMORY_ATTENTION = (106, 5_922_304)
OFFICIAL_MEMORY_ENCODER = (40, 1_384_608)


def _memory_attention(
    d_model: int = 32,
    kv_in_dim: int = 16,
    num_heads: int = 2,
    dim_feedforward: int = 64,
    num_layers: int = 2,
    dropout: float = 0.0,
    pos_enc_at_input: bool = True,
) -> MemoryAttention:
    layer = MemoryAttentionLayer(
        self_attention=RoPEAttention(d_model, num_heads, dropout=dropout),
        cross_attention=RoPEAttention(
            d_model, num_heads, dropout=dropout, kv_in_dim=kv_in_dim, rope_k_repeat=True
        ),
        d_model=d_model,
        dim_feedforward=dim_feedforward,
        dropout=dropout,
    )
    return MemoryAttention(d_model, pos_enc_at_input, layer, num_layers).eval()


def _memory_encoder(in_dim: int = 32, out_dim: int = 16) -> MemoryEncoder:
    return MemoryEncoder(
        out_dim,
        MaskDownSampler(embed_dim=in_dim),
        Fuser(CXBlock(in_dim), num_layers=2),
        PositionEmbeddingSine(out_dim),
        in_dim=in_dim,
    ).eval()


def _sam2_memory_modules() -> tuple[MemoryAttention, MemoryEncoder]:
    attention = _memory_attention(256, 64, num_heads=1, dim_feedforward=2048, num_layers=4, dropout=0.1)
    return attention, _memory_encoder(256, 64)


def _attention_inputs(side: int = 4, frames: int = 3, pointer_tokens: int = 4, batch: int = 2, seed: int = 0):
    """Sequence-first inputs of the small config (d_model 32, memory width 16)."""
    g = torch.Generator().manual_seed(seed)
    hw, m = side * side, frames * side * side + pointer_tokens
    return dict(
        curr=torch.randn(hw, batch, 32, generator=g),
        memory=torch.randn(m, batch, 16, generator=g),
        curr_pos=torch.randn(hw, batch, 32, generator=g),
        memory_pos=torch.randn(m, batch, 16, generator=g),
        num_obj_ptr_tokens=pointer_tokens,
    )


# --- checkpoint layout -------------------------------------------------------------------------------------


def test_sam2_memory_modules_have_official_key_and_parameter_counts():
    for module, (n_keys, n_params) in zip(
        _sam2_memory_modules(), (OFFICIAL_MEMORY_ATTENTION, OFFICIAL_MEMORY_ENCODER), strict=True
    ):
        state = module.state_dict()
        assert len(state) == n_keys
        assert sum(t.numel() for t in state.values()) == n_params


@pytest.mark.parametrize("preset", ["configs/sam2/sam2_hiera_t.yaml", "configs/sam2.1/sam2.1_hiera_l.yaml"])
def test_sam2_memory_modules_match_official_keys_and_shapes(preset, sam2_keys):
    official = dict(sam2_keys[preset]["keys"])
    for module, prefix in zip(_sam2_memory_modules(), ("memory_attention.", "memory_encoder."), strict=True):
        expected = {k[len(prefix) :]: shape for k, shape in official.items() if k.startswith(prefix)}
        assert {k: list(v.shape) for k, v in module.state_dict().items()} == expected


def test_mask_downsampler_stages_follow_the_stride():
    indices = [name.split(".")[1] for name in MaskDownSampler().state_dict() if name.endswith("weight")]
    assert indices == ["0", "1", "3", "4", "6", "7", "9", "10", "12"]  # conv, norm (GELU has no weights)
    assert len(MaskDownSampler(kernel_size=4, stride=4, padding=0).encoder) == 2 * 3 + 1
    with pytest.raises(ValueError, match="power"):
        MaskDownSampler(total_stride=12)


# --- RoPE --------------------------------------------------------------------------------------------------


def test_rope_angles_follow_columns_then_rows():
    head_dim, side = 16, 5
    angles = axial_rope_angles(head_dim, side)
    freqs = [10000.0 ** (-4 * j / head_dim) for j in range(head_dim // 4)]
    for row, col in ((0, 0), (0, 3), (2, 1), (4, 4)):
        expected = [col * f for f in freqs] + [row * f for f in freqs]
        torch.testing.assert_close(angles[row * side + col], torch.tensor(expected))

    # A pair (1, 0) turns into (cos a, sin a): the angle lands on the pair's own two channels.
    x = torch.zeros(1, 1, side * side, head_dim)
    x[..., 0::2] = 1.0
    q, _ = AxialRoPE(head_dim)(x, x.clone())
    torch.testing.assert_close(q[0, 0, :, 0::2], angles.cos())
    torch.testing.assert_close(q[0, 0, :, 1::2], angles.sin())


def test_rope_scores_depend_only_on_relative_position():
    side, head_dim = 6, 16
    g = torch.Generator().manual_seed(1)
    # The same content at every token, so any change in the scores comes from the positions.
    q = torch.randn(head_dim, generator=g).expand(1, 1, side * side, head_dim)
    k = torch.randn(head_dim, generator=g).expand(1, 1, side * side, head_dim)
    q, k = AxialRoPE(head_dim)(q, k)
    scores = (q[0, 0] @ k[0, 0].T).reshape(side, side, side, side)  # [q row, q col, k row, k col]
    # Shifting both grids by 1 row and 2 columns leaves every score unchanged ...
    torch.testing.assert_close(scores[:-1, :-2, :-1, :-2], scores[1:, 2:, 1:, 2:])
    # ... while a different offset, along either axis, changes it.
    assert not torch.allclose(scores[0, 0, 0, 0], scores[0, 0, 0, 1])
    assert not torch.allclose(scores[0, 0, 0, 0], scores[0, 0, 1, 0])


def test_rope_rotates_each_memory_frame_like_the_queries_and_skips_pointer_tokens():
    side, head_dim, pointer_tokens = 4, 8, 3
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 2, side * side, head_dim, generator=g)
    frames = [torch.randn(2, 2, side * side, head_dim, generator=g) for _ in range(2)]
    pointers = torch.randn(2, 2, pointer_tokens, head_dim, generator=g)
    rope = AxialRoPE(head_dim)
    _, k = rope(q, torch.cat([*frames, pointers], dim=2), repeat_k=True, num_k_exclude=pointer_tokens)
    for i, frame in enumerate(frames):
        rotated_alone, _ = rope(frame, frame)
        torch.testing.assert_close(k[:, :, i * side * side : (i + 1) * side * side], rotated_alone)
    assert torch.equal(k[:, :, -pointer_tokens:], pointers)


def test_rope_rejects_keys_that_do_not_fit_the_query_grid():
    rope = AxialRoPE(8)
    q = torch.randn(1, 1, 16, 8)
    with pytest.raises(ValueError, match="square"):
        rope(torch.randn(1, 1, 15, 8), torch.randn(1, 1, 15, 8))
    with pytest.raises(ValueError, match="repeat_k"):
        rope(q, torch.randn(1, 1, 32, 8))
    with pytest.raises(ValueError, match="do not match"):
        rope(q, torch.randn(1, 1, 40, 8), repeat_k=True)
    with pytest.raises(ValueError, match="exclude"):
        rope(q, torch.randn(1, 1, 4, 8), num_k_exclude=5)
    with pytest.raises(ValueError, match="divisible by 4"):
        AxialRoPE(6)


def test_rope_keeps_dtype_and_cache_from_inference_mode_serves_training():
    rope = AxialRoPE(8)
    with torch.inference_mode():
        rope(torch.randn(1, 1, 16, 8), torch.randn(1, 1, 16, 8))
    q = torch.randn(1, 1, 16, 8, requires_grad=True)
    out, _ = rope(q, q.detach())
    out.sum().backward()  # would raise if the cached rotations were inference tensors
    assert q.grad is not None
    half, _ = rope(q.detach().bfloat16(), q.detach().bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), out.detach(), atol=0.05, rtol=0.02)


# --- memory attention --------------------------------------------------------------------------------------


def test_memory_attention_output_shape_and_batch_independence():
    model = _memory_attention()
    inputs = _attention_inputs(batch=2)
    with torch.no_grad():
        out = model(**inputs)
        assert out.shape == inputs["curr"].shape  # [HW, B, d_model], sequence-first
        single = {k: v[:, 1:2] if torch.is_tensor(v) else v for k, v in inputs.items()}
        torch.testing.assert_close(model(**single), out[:, 1:2])


def test_memory_attention_ignores_the_order_of_memory_frames_and_of_pointers_but_not_of_grid_tokens():
    model = _memory_attention()
    side, frames, pointer_tokens = 4, 3, 4
    inputs = _attention_inputs(side, frames, pointer_tokens, batch=1)
    hw = side * side
    frame_order = [2, 0, 1]
    perm_frames = torch.cat([torch.arange(f * hw, (f + 1) * hw) for f in frame_order])
    perm_frames = torch.cat([perm_frames, torch.arange(frames * hw, frames * hw + pointer_tokens)])
    perm_pointers = torch.cat([torch.arange(frames * hw), frames * hw + torch.tensor([3, 1, 0, 2])])
    perm_grid = torch.cat([torch.arange(hw).flip(0), torch.arange(hw, frames * hw + pointer_tokens)])

    def run(perm: torch.Tensor) -> torch.Tensor:
        moved = dict(inputs, memory=inputs["memory"][perm], memory_pos=inputs["memory_pos"][perm])
        with torch.no_grad():
            return model(**moved)

    reference = run(torch.arange(frames * hw + pointer_tokens))
    # Every frame is rotated with the same grid, and pointers carry no position: reordering either is harmless.
    torch.testing.assert_close(run(perm_frames), reference)
    torch.testing.assert_close(run(perm_pointers), reference)
    # Tokens moved inside a frame (with their sine encodings) land on other RoPE positions.
    assert not torch.allclose(run(perm_grid), reference, atol=1e-4)


@pytest.mark.parametrize("pos_enc_at_input", [True, False])
def test_current_position_encoding_enters_only_at_the_input(pos_enc_at_input):
    model = _memory_attention(pos_enc_at_input=pos_enc_at_input)
    inputs = _attention_inputs(batch=1)
    with torch.no_grad():
        out = model(**inputs)
        other_pos = model(**dict(inputs, curr_pos=torch.randn_like(inputs["curr_pos"])))
        shifted_curr = model(
            **dict(inputs, curr=inputs["curr"] + 0.1 * inputs["curr_pos"], curr_pos=0 * inputs["curr_pos"])
        )
    if pos_enc_at_input:
        assert not torch.allclose(out, other_pos, atol=1e-4)
        torch.testing.assert_close(shifted_curr, out)  # it is exactly curr + 0.1 * curr_pos
    else:
        torch.testing.assert_close(other_pos, out)


def test_memory_attention_dropout_only_in_training_and_all_weights_get_gradients():
    model = _memory_attention(dropout=0.3)
    inputs = _attention_inputs(batch=1)
    with torch.no_grad():
        evaluated = model(**inputs)
        torch.testing.assert_close(model(**inputs), evaluated)
    model.train()
    torch.manual_seed(0)
    trained = model(**inputs)
    assert not torch.allclose(trained, evaluated, atol=1e-3)
    trained.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_memory_attention_rejects_mismatched_batches_and_unknown_activation():
    model = _memory_attention()
    inputs = _attention_inputs(batch=2)
    with pytest.raises(ValueError, match="batch"):
        model(**dict(inputs, memory=inputs["memory"][:, :1], memory_pos=inputs["memory_pos"][:, :1]))
    with pytest.raises(ValueError, match="activation"):
        MemoryAttentionLayer(
            self_attention=RoPEAttention(32, 1),
            cross_attention=RoPEAttention(32, 1),
            d_model=32,
            activation="tanh",
        )


# --- memory encoder ----------------------------------------------------------------------------------------


def test_memory_encoder_shapes_and_position_encoding():
    encoder = _memory_encoder()
    g = torch.Generator().manual_seed(3)
    pix_feat, masks = torch.randn(2, 32, 4, 6, generator=g), torch.randn(2, 1, 64, 96, generator=g)
    with torch.no_grad():
        out = encoder(pix_feat, masks)
    assert out["vision_features"].shape == (2, 16, 4, 6)
    (pos,) = out["vision_pos_enc"]
    torch.testing.assert_close(pos, PositionEmbeddingSine(16)(out["vision_features"]))


def test_memory_encoder_mask_sigmoid_and_mask_influence():
    encoder = _memory_encoder()
    g = torch.Generator().manual_seed(4)
    pix_feat, logits = torch.randn(1, 32, 4, 4, generator=g), 5 * torch.randn(1, 1, 64, 64, generator=g)
    with torch.no_grad():
        from_logits = encoder(pix_feat, logits)["vision_features"]
        from_probs = encoder(pix_feat, torch.sigmoid(logits), skip_mask_sigmoid=True)["vision_features"]
        other_mask = encoder(pix_feat, -logits)["vision_features"]
    torch.testing.assert_close(from_probs, from_logits)
    assert not torch.allclose(other_mask, from_logits, atol=1e-4)


def test_cx_block_is_the_identity_when_its_layer_scale_is_zero():
    block = CXBlock(8, layer_scale_init_value=0.0)
    x = torch.randn(1, 8, 5, 5)
    torch.testing.assert_close(block(x), x)
    with torch.no_grad():
        block.gamma.fill_(1.0)
    assert not torch.allclose(block(x), x)
    assert math.isclose(CXBlock(8).gamma.mean().item(), 1e-6, rel_tol=1e-6)
