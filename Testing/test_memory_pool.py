"""Memory attention on pooled maps (``ModelConfig.memory_attention_pool``), the CPU-friendly option."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from golden import GOLDEN, golden_config
from safetensors.torch import load_file

import medsam2


def _pooled_model(pool: int) -> medsam2.SAM2Model:
    config = dataclasses.replace(golden_config(), memory_attention_pool=pool)
    weights = load_file(GOLDEN / "sam2.1" / "weights.safetensors")
    if pool > 1:  # the pooled path's LayerScale, which the official layout does not have
        weights["memory_attention_scale"] = torch.ones(config.hidden_dim)
    model = medsam2.build_model(config).eval()
    model.load_state_dict(weights, strict=True)
    with torch.no_grad():
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias += 5.0
    return model


def _frames() -> np.ndarray:
    z, y, x = np.mgrid[:6, :40, :48]
    return (0.2 + 0.6 * (((y - 18) / 9) ** 2 + ((x - 20 - z) / 12) ** 2 < 1)).astype(np.float32)


def test_pooled_attention_sees_a_quarter_of_the_tokens_and_keeps_the_embedding_size():
    model = _pooled_model(2)
    calls = []
    original = model.memory_attention.forward

    def spy(**kwargs):
        calls.append({k: v.shape for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
        return original(**kwargs)

    model.memory_attention.forward = spy
    session = medsam2.Session(model, _frames(), memory=medsam2.MemoryOptions(policy="recent"))
    session.add_prompt(0, box=(8, 9, 32, 27))
    results = dict(session.propagate())
    side = model.config.image_embedding_size
    assert calls and all(call["curr"][0] == (side // 2) ** 2 for call in calls)
    # Memory frames are pooled too. Frame t attends to the prompted frame and frames 1..t-1, each with its
    # pooled map and its object pointer (hidden_dim / mem_dim tokens).
    per_frame = (side // 2) ** 2 + model.config.hidden_dim // model.config.mem_dim
    assert [call["memory"][0] for call in calls] == [t * per_frame for t in range(1, len(calls) + 1)]
    assert all(out[1].shape == (40, 48) and np.isfinite(out[1]).all() for out in results.values())


def test_pooling_changes_only_the_attention_path():
    """Same weights: the prompted frame (no memory read) is identical with and without pooling; tracked
    frames differ, since their memory was attended at another resolution."""
    plain, pooled = _pooled_model(1), _pooled_model(2)
    outputs = []
    for model in (plain, pooled):
        session = medsam2.Session(model, _frames(), memory=medsam2.MemoryOptions(policy="recent"))
        first = session.add_prompt(0, box=(8, 9, 32, 27))
        outputs.append((first, dict(session.propagate())))
    np.testing.assert_array_equal(outputs[0][0], outputs[1][0])
    assert not np.allclose(outputs[0][1][3][1], outputs[1][1][3][1])


def test_pooled_change_is_scaled_per_channel():
    model = _pooled_model(2)
    session = medsam2.Session(model, _frames(), memory=medsam2.MemoryOptions(policy="recent"))
    session.add_prompt(0, box=(8, 9, 32, 27))
    list(session.propagate(max_frames=2))
    track = session.tracks[1]
    context = session.policy.context(track, 3, False, session.num_frames, None)
    features = session._frame_features(3)
    with torch.no_grad():
        full = model.attend_memory(features, context) - features.embedding
        model.memory_attention_scale[::2] = 0.0
        model.memory_attention_scale[1::2] = 0.5
        scaled = model.attend_memory(features, context) - features.embedding
    assert full.abs().amax() > 1e-3
    assert torch.equal(scaled[:, ::2], torch.zeros_like(scaled[:, ::2]))
    torch.testing.assert_close(scaled[:, 1::2], 0.5 * full[:, 1::2])
