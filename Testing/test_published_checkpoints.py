"""Published checkpoints as their authors save and run them: bare bfloat16 state dicts, recognition by digest,
the input size of a file given by path, and the exact keys of a file that does not fit."""

from __future__ import annotations

import dataclasses
import hashlib
import warnings

import pytest
import torch
from golden import golden_config

import medsam2
from medsam2 import models
from medsam2.checkpoint import save_state_dict

SAM20_TINY = "configs/sam2/sam2_hiera_t.yaml"


@pytest.fixture
def registry(monkeypatch, tmp_path):
    """A private copy of the registry and an empty cache folder."""
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))
    monkeypatch.setenv("MEDSAM2_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    return tmp_path / "cache"


def bare_bf16_sam20_tiny(sam2_keys) -> dict[str, torch.Tensor]:
    """Random weights with the keys and shapes of SAM 2.0 tiny, in bfloat16, as Medical-SAM2 saves them."""
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=g).bfloat16() for k, shape in sam2_keys[SAM20_TINY]["keys"]}


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bare_bfloat16_state_dict_loads_through_the_medsam2_pretrain_entry(sam2_keys, registry):
    sd = bare_bf16_sam20_tiny(sam2_keys)
    path = registry / "MedSAM2_pretrain.pth"
    torch.save(sd, path)  # a bare dict, no {"model": ...} wrapper
    # The published file cannot be downloaded here: the entry is pointed at this file's digest instead.
    models.register(dataclasses.replace(models.get("MedSAM2_pretrain"), sha256=sha256(path)))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a registered file's size is known, not guessed
        model = medsam2.load_model("MedSAM2_pretrain", device="cpu")
    assert (model.config.name, model.image_size, model.dtype) == ("sam2_hiera_t", 1024, torch.float32)
    for key in ("image_encoder.trunk.pos_embed", "maskmem_tpos_enc", "obj_ptr_proj.layers.0.weight"):
        assert torch.equal(model.state_dict()[key], sd[key].float())


def test_a_file_that_does_not_load_strictly_names_every_key(sam2_keys, tmp_path):
    sd = bare_bf16_sam20_tiny(sam2_keys)
    dropped = [k for k in sd if k.startswith("memory_encoder.fuser.")]
    for key in dropped:
        del sd[key]
    sd["extra.head.weight"] = torch.zeros(2).bfloat16()
    path = tmp_path / "MedSAM2_pretrain.pth"
    torch.save(sd, path)
    with pytest.raises(medsam2.CheckpointError) as info:
        medsam2.load_model(path, config="sam2_hiera_t", device="cpu")
    message = str(info.value)
    assert len(dropped) > 12  # more than a shortened list would show
    assert f"{len(dropped)} missing keys: {', '.join(dropped)}" in message
    assert "1 unexpected keys: extra.head.weight" in message


def test_a_registered_file_given_by_path_runs_at_its_entry_size(registry, tmp_path):
    config = golden_config()  # a tiny SAM 2.1-style model, small enough to write
    model = medsam2.build_model(config)
    path = save_state_dict(model, tmp_path / "downloaded-by-hand.safetensors")
    models.register(
        dataclasses.replace(
            models.get("MedSAM2_latest"),
            name="tiny-release",
            preset=config,
            image_size=256,
            sha256=sha256(path),
        )
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = medsam2.load_model(path, device="cpu")
    assert loaded.image_size == 256 and config.image_size == 128
    assert medsam2.load_model(path, image_size=192, device="cpu").image_size == 192  # the argument wins
    assert not (path.parent / (path.name + ".sha256")).exists()  # nothing written next to the user's file


def test_an_unknown_file_warns_that_its_size_was_guessed(sam2_keys, registry, tmp_path):
    path = tmp_path / "MedSAM2_latest.pt"
    g = torch.Generator().manual_seed(1)
    torch.save(
        {
            "model": {
                k: torch.randn(s, generator=g)
                for k, s in sam2_keys["configs/sam2.1/sam2.1_hiera_t.yaml"]["keys"]
            }
        },
        path,
    )
    with pytest.warns(medsam2.ImageSizeGuessed) as record:
        model = medsam2.load_model(path, device="cpu")
    message = str(record[0].message)
    assert model.image_size == 1024 and "guessed: 1024 px" in message
    assert "named like the registered MedSAM2_latest, which its authors run at 512 px" in message
    assert "--image-size" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert medsam2.load_model(path, image_size=512, device="cpu").image_size == 512
