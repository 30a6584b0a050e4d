"""The panel's model choice for published checkpoints: the default proposal, the one confirmation before a
download (size, licence), and the image size of a local file. Pure Python: no Slicer needed."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch

from medsam2 import models
from MedSAM2SlicerLib import model_choice


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(model_choice.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))
    return tmp_path / "cache"


def test_proposed_model_follows_the_gpu():
    assert model_choice.proposed_model(cuda_available=True) == "MedSAM2_latest"
    assert model_choice.proposed_model(cuda_available=False) == "medsam2-lite"


def test_download_question_shows_size_and_licence_until_cached(cache):
    question = model_choice.download_question("MedSAM2_latest")
    assert question.startswith("Download MedSAM2_latest (149 MiB, licence CC-BY-SA-4.0)?")
    assert "not verifiable" in question and str(cache) in question
    assert "verified against its published sha256" in model_choice.download_question("MedSAM2_pretrain")
    cache.mkdir()
    (cache / "MedSAM2_latest.pt").write_bytes(b"x")
    assert model_choice.download_question("MedSAM2_latest") is None  # nothing to download, nothing to ask
    assert model_choice.download_question("medsam2-lite") is None
    assert model_choice.download_question(model_choice.LOCAL_FILE) is None


@pytest.mark.parametrize("text, size", [("", None), (" 512 ", 512), ("1024", 1024)])
def test_image_size_field(text, size):
    assert model_choice.parse_image_size(text) == size


@pytest.mark.parametrize("text", ["500", "0", "-512", "abc", "4096"])
def test_bad_image_size_says_what_is_expected(text):
    with pytest.raises(ValueError, match="multiple of 32"):
        model_choice.parse_image_size(text)


def test_local_file_is_recognised_by_digest(cache, tmp_path):
    path = tmp_path / "my_download.pth"
    torch.save({"w": torch.zeros(3)}, path)
    assert "set its image size" in model_choice.local_file_status(str(path), None)
    assert model_choice.local_file_status(str(path), 512).endswith("runs at 512 px")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    models.register(dataclasses.replace(models.get("MedSAM2_pretrain"), sha256=digest))
    status = model_choice.local_file_status(str(path), None)
    assert status == "recognised: MedSAM2_pretrain (unclear (Apache-2.0 or GPL)), runs at 1024 px"
    assert model_choice.local_file_status(str(tmp_path / "missing.pt"), None) == "choose a checkpoint file"
