"""Checkpoint loading: official key sets for every preset, preset detection, and every refusal."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest
import torch

import medsam2
from medsam2.checkpoint import detect_preset, read_state_dict, save_state_dict

PRESETS = {
    "sam2_hiera_t": "configs/sam2/sam2_hiera_t.yaml",
    "sam2_hiera_s": "configs/sam2/sam2_hiera_s.yaml",
    "sam2_hiera_b+": "configs/sam2/sam2_hiera_b+.yaml",
    "sam2_hiera_l": "configs/sam2/sam2_hiera_l.yaml",
    "sam2.1_hiera_t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_l": "configs/sam2.1/sam2.1_hiera_l.yaml",
}


@pytest.fixture(scope="module")
def reference(sam2_keys) -> dict:
    return sam2_keys


@pytest.fixture(scope="module")
def tiny_files(reference, tmp_path_factory) -> dict[str, Path]:
    """Official-layout random checkpoints of the tiny presets, written once for the module."""
    folder = tmp_path_factory.mktemp("official")
    files = {}
    for preset in ("sam2_hiera_t", "sam2.1_hiera_t"):
        files[preset] = folder / f"{preset}.pt"
        official_checkpoint(reference, preset, files[preset])
    return files


def official_checkpoint(reference: dict, preset: str, path: Path, dtype=torch.float32) -> dict:
    """A random-weight checkpoint in the official layout ``{"model": state_dict}`` with the official keys."""
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=g).to(dtype) for k, shape in reference[PRESETS[preset]]["keys"]}
    torch.save({"model": sd}, path)
    return sd


@pytest.mark.parametrize("preset", list(PRESETS))
def test_state_dict_matches_official_keys_and_shapes(reference, preset):
    with torch.device("meta"):
        model = medsam2.build_model(medsam2.ModelConfig.preset(preset))
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    official = [(k, shape) for k, shape in reference[PRESETS[preset]]["keys"]]
    assert sorted(ours) == sorted(official)
    assert sum(v.numel() for v in model.state_dict().values()) == reference[PRESETS[preset]]["n_params"]


@pytest.mark.parametrize(
    "preset",
    ["sam2_hiera_t", "sam2.1_hiera_t"]
    + [pytest.param(p, marks=pytest.mark.slow) for p in PRESETS if not p.endswith("_t")],
)
def test_official_checkpoint_loads_strictly_with_detected_preset(reference, preset, tiny_files, tmp_path):
    path = tiny_files.get(preset) or tmp_path / "official.pt"
    if preset in tiny_files:
        sd = torch.load(path, weights_only=True)["model"]
    else:
        sd = official_checkpoint(reference, preset, path)
    assert detect_preset(sd) == preset
    model = medsam2.load_model(path, device="cpu")
    assert model.config.name == preset
    loaded = model.state_dict()
    for key in ("maskmem_tpos_enc", "image_encoder.trunk.pos_embed", "sam_mask_decoder.iou_token.weight"):
        assert torch.equal(loaded[key], sd[key])


def test_image_size_follows_argument_and_rope_adapts(tiny_files):
    model = medsam2.load_model(tiny_files["sam2.1_hiera_t"], image_size=512, device="cpu")
    assert model.image_size == 512
    with torch.inference_mode():
        features = model.encode_image(torch.zeros(1, 3, 512, 512))
        assert features.embedding.shape == (1, 256, 32, 32)
        pred = model.predict(features, None, points=(torch.tensor([[[256.0, 256.0]]]), torch.tensor([[1]])))
    assert pred.high_res_logits.shape == (1, 1, 512, 512)


def test_bfloat16_checkpoint_and_safetensors_round_trip(reference, tmp_path):
    path = tmp_path / "bf16.pt"
    sd = official_checkpoint(reference, "sam2_hiera_t", path, dtype=torch.bfloat16)
    model = medsam2.load_model(path, device="cpu")
    assert model.dtype == torch.float32
    assert torch.equal(model.state_dict()["no_mem_embed"], sd["no_mem_embed"].float())
    saved = save_state_dict(model, tmp_path / "ours.safetensors")
    again = medsam2.load_model(saved, device="cpu")
    assert again.config.name == "sam2_hiera_t"
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_sam21_file_forced_into_sam20_preset_names_the_extra_keys(tiny_files):
    path = tiny_files["sam2.1_hiera_t"]
    with pytest.raises(medsam2.CheckpointError) as err:
        medsam2.load_model(path, config="sam2_hiera_t", device="cpu")
    message = str(err.value)
    assert str(path) in message and "sam2.1_hiera_t" in message
    for key in ("no_obj_embed_spatial", "obj_ptr_tpos_proj.weight", "obj_ptr_tpos_proj.bias"):
        assert key in message
    assert "unexpected keys" in message


def test_sam20_file_forced_into_sam21_preset_names_missing_keys(tiny_files):
    with pytest.raises(medsam2.CheckpointError, match="missing keys: .*no_obj_embed_spatial"):
        medsam2.load_model(tiny_files["sam2_hiera_t"], config="sam2.1_hiera_t", device="cpu")


def test_wrong_architecture_is_refused_with_shapes(reference, tmp_path):
    path = tmp_path / "small_as_tiny.pt"
    official_checkpoint(reference, "sam2_hiera_s", path)
    with pytest.raises(medsam2.CheckpointError) as err:
        medsam2.load_model(path, config="sam2_hiera_t", device="cpu")
    assert "sam2_hiera_s" in str(err.value) and "unexpected keys" in str(err.value)


def test_unrecognised_model_without_config(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model": {"backbone.weight": torch.zeros(3)}}, path)
    with pytest.raises(medsam2.CheckpointError, match="Cannot tell which model.*not a SAM 2 model"):
        medsam2.load_model(path, device="cpu")


def test_truncated_file(tiny_files, tmp_path):
    path = tmp_path / "truncated.pt"
    data = tiny_files["sam2_hiera_t"].read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(medsam2.CheckpointError, match="truncated"):
        read_state_dict(path)


def test_truncated_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"a": torch.zeros(1000)}, str(path))
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(medsam2.CheckpointError, match="safetensors"):
        read_state_dict(path)


@pytest.mark.parametrize(
    "content",
    [b"this is a text file, not a checkpoint\n", b""],
    ids=["text", "empty"],
)
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    with pytest.raises(medsam2.CheckpointError, match=str(path.name)):
        read_state_dict(path)


def test_pickle_of_something_else(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(medsam2.CheckpointError, match="does not hold a state dict"):
        read_state_dict(path)


def test_missing_file(tmp_path):
    with pytest.raises(medsam2.CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "absent.pt")


class _Payload:
    """Unpickling this object would create a marker file: a stand-in for malicious code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_pickle_that_runs_code_is_refused_and_code_does_not_run(tmp_path, container):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    payload = {"model": {"weight": torch.zeros(1)}, "hook": _Payload(marker)}
    if container == "zip":
        torch.save(payload, path)
        assert zipfile.is_zipfile(path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(medsam2.CheckpointError, match="refused|cannot be read"):
        read_state_dict(path)
    assert not marker.exists()
