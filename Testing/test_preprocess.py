"""medsam2.preprocess on the real chest CT shipped with slicerio and on synthetic MR-like volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medsam2 import io, preprocess
from medsam2.errors import InputError

slicerio = pytest.importorskip("slicerio")
CT = Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd"


@pytest.fixture(scope="module")
def ct() -> np.ndarray:
    return io.read_image(CT).array


def _mr_like(background_fraction: float, seed: int = 4) -> np.ndarray:
    """Positive, skewed, non-integer intensities inside a box, zeros around it."""
    rng = np.random.default_rng(seed)
    volume = rng.gamma(shape=4.0, scale=150.0, size=(20, 40, 40)).astype(np.float32)
    volume.reshape(-1)[: int(background_fraction * volume.size)] = 0.0
    return volume


def test_window_presets_are_level_width_pairs() -> None:
    assert preprocess.WINDOW_PRESETS == {
        "abdomen": (40.0, 400.0),
        "lung": (-600.0, 1500.0),
        "bone": (400.0, 1800.0),
        "brain": (40.0, 80.0),
        "mediastinum": (50.0, 350.0),
    }


def test_real_ct_is_recognised(ct: np.ndarray) -> None:
    assert preprocess.guess_modality(ct) == "ct"
    assert preprocess.guess_modality(ct.astype(np.float32)) == "ct"
    # the same values shifted to start at 0 (raw stored values without the rescale intercept) are not HU
    assert preprocess.guess_modality(ct + 3024) == "other"
    # interpolated (fractional) values do not pass as HU
    assert preprocess.guess_modality(ct + 0.37) == "other"
    assert preprocess.guess_modality(_mr_like(0.5)) == "other"


def test_abdomen_window_on_real_ct(ct: np.ndarray) -> None:
    before = ct.copy()
    prepared = preprocess.prepare_intensities(ct, window="abdomen")
    np.testing.assert_array_equal(ct, before)
    assert prepared.dtype == np.float32 and prepared.shape == ct.shape
    # level 40, width 400: -160 HU -> 0, 240 HU -> 1
    expected = np.clip((ct.astype(np.float64) + 160.0) / 400.0, 0.0, 1.0)
    np.testing.assert_allclose(prepared, expected, atol=1e-6)
    assert 0.3 < np.mean(prepared == 0.0) < 0.9  # air and lungs are below the window
    assert 0.0 < np.mean((prepared > 0) & (prepared < 1)) < 0.5

    np.testing.assert_array_equal(preprocess.prepare_intensities(ct), prepared)  # auto: CT, abdomen window
    np.testing.assert_array_equal(preprocess.prepare_intensities(ct, "ct", (40, 400)), prepared)
    lung = preprocess.prepare_intensities(ct, window="lung")
    np.testing.assert_allclose(lung, np.clip((ct + 1350.0) / 1500.0, 0.0, 1.0), atol=1e-6)


def test_mr_percentiles_skip_a_large_background() -> None:
    volume = _mr_like(0.5)
    prepared = preprocess.prepare_intensities(volume)
    foreground = volume[volume != 0]
    low, high = np.percentile(foreground, [0.5, 99.5])
    np.testing.assert_allclose(prepared, np.clip((volume - low) / (high - low), 0, 1), atol=1e-6)
    assert prepared.min() == 0.0 and prepared.max() == 1.0
    # the top 0.5 % of the foreground saturates; the background is 0
    assert np.mean(prepared[volume != 0] == 1.0) == pytest.approx(0.005, abs=0.001)
    assert np.all(prepared[volume == 0] == 0.0)


def test_mr_percentiles_over_all_voxels_when_background_is_small() -> None:
    volume = _mr_like(0.1)
    prepared = preprocess.prepare_intensities(volume, modality="mr")
    low, high = np.percentile(volume, [0.5, 99.5])
    assert low == 0.0  # the zeros (10 %) are part of the distribution here
    np.testing.assert_allclose(prepared, np.clip(volume / high, 0, 1), atol=1e-6)


def test_a_window_applies_to_any_modality() -> None:
    volume = _mr_like(0.0)
    prepared = preprocess.prepare_intensities(volume, modality="other", window=(500, 200))
    np.testing.assert_allclose(prepared, np.clip((volume - 400.0) / 200.0, 0, 1), atol=1e-6)


def test_bad_inputs() -> None:
    volume = _mr_like(0.2)
    volume[3, 4, 5] = np.nan
    with pytest.raises(InputError, match="NaN"):
        preprocess.prepare_intensities(volume)
    with pytest.raises(InputError, match=r"same intensity \(5\)"):
        preprocess.prepare_intensities(np.full((4, 4, 4), 5, np.int16))
    with pytest.raises(InputError, match="Unknown window 'liver'"):
        preprocess.prepare_intensities(_mr_like(0.2), window="liver")
    with pytest.raises(InputError, match="width must be positive"):
        preprocess.prepare_intensities(_mr_like(0.2), window=(40, 0))
    with pytest.raises(InputError, match="Unknown modality"):
        preprocess.prepare_intensities(_mr_like(0.2), modality="pet")
    with pytest.raises(InputError, match="shape"):
        preprocess.prepare_intensities(np.arange(10.0))


def test_resize_slices_is_bilinear_without_antialiasing() -> None:
    ramp = np.tile(np.arange(4, dtype=np.float32), (2, 4, 1))  # [T=2, 4, 4], x = 0, 1, 2, 3
    resized = preprocess.resize_slices(ramp, 8)
    assert isinstance(resized, np.ndarray) and resized.shape == (2, 8, 8)
    # half-pixel centres: output x maps to input x / 2 - 0.25, clamped at the edges
    np.testing.assert_allclose(resized[1, 5], [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3], atol=1e-6)

    line = np.zeros((1, 8, 8), np.float32)
    line[..., 3] = 1.0
    # 8 -> 4 without antialiasing samples halfway between columns 2 and 3: the line is not spread further
    np.testing.assert_allclose(preprocess.resize_slices(line, 4)[0, 0], [0, 0.5, 0, 0], atol=1e-6)


def test_resize_logits_back_to_the_slice_grid() -> None:
    logits = torch.randn(3, 16, 16)
    back = preprocess.resize_logits_to(logits, (37, 23))
    assert isinstance(back, torch.Tensor) and back.shape == (3, 37, 23)
    constant = preprocess.resize_logits_to(np.full((1, 8, 8), -2.5, np.float32), (5, 11))
    assert isinstance(constant, np.ndarray) and constant.shape == (1, 5, 11)
    np.testing.assert_allclose(constant, -2.5)
    # same size in, same values out
    torch.testing.assert_close(preprocess.resize_logits_to(logits, (16, 16)), logits)
