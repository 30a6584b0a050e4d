"""medsam2.FeatureCache: image features shared between segment_volume runs (a correction, a second object),
with results identical to runs without it, an LRU byte limit, and keys that tell models and windows apart."""

from __future__ import annotations

import numpy as np
import pytest
from golden import golden_model

import medsam2
from medsam2 import Prompt
from medsam2.feature_cache import FeatureCache

SHAPE = (12, 16, 20)


@pytest.fixture(scope="module")
def model() -> medsam2.SAM2Model:
    return golden_model(presence_shift=5.0)


def _volume() -> np.ndarray:
    z, y, x = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    blob = ((z - 5) ** 2 / 9 + (y - 7) ** 2 / 16 + (x - 11) ** 2 / 25) < 1
    return (40 + 120 * blob + np.random.default_rng(1).normal(0, 5, SHAPE)).astype(np.float32)


def _run(model, prompts, cache=None, **options):
    options = {"modality": "mr", "orientations": 6, **options}
    return medsam2.segment_volume(model, _volume(), prompts, feature_cache=cache, **options)


def test_a_second_run_reuses_the_encoded_slices_and_gives_the_same_result(model):
    first_prompt = [Prompt(axis=0, index=5, box=(7, 3, 16, 12))]
    plain = _run(model, first_prompt)
    cache = FeatureCache(1 << 30)
    cold = _run(model, first_prompt, cache)
    warm = _run(model, first_prompt, cache)
    assert cold.frames_encoded == plain.frames_encoded > 0
    assert warm.frames_encoded == 0
    np.testing.assert_array_equal(cold.labels, plain.labels)
    np.testing.assert_array_equal(warm.labels, plain.labels)
    for obj_id, probability in plain.probabilities.items():
        np.testing.assert_array_equal(warm.probabilities[obj_id], probability)

    # A correction: a mask on another slice; most of its slices were encoded by the first run.
    mask = np.zeros(SHAPE[1:], bool)
    mask[5:10, 8:14] = True
    corrected = [*first_prompt, Prompt(axis=0, index=7, mask=mask)]
    without_cache = _run(model, corrected)
    with_cache = _run(model, corrected, cache)
    assert with_cache.frames_encoded < without_cache.frames_encoded
    np.testing.assert_array_equal(with_cache.labels, without_cache.labels)
    assert cache.stats()["hits"] > 0


def test_another_window_or_model_does_not_hit(model):
    prompt = [Prompt(axis=0, index=5, box=(7, 3, 16, 12))]
    cache = FeatureCache(1 << 30)
    _run(model, prompt, cache, modality="ct", window=(60, 200), orientations=2)
    other_window = _run(model, prompt, cache, modality="ct", window=(40, 400), orientations=2)
    assert other_window.frames_encoded > 0
    other_model = golden_model(presence_shift=5.0)
    again = _run(other_model, prompt, cache, modality="ct", window=(40, 400), orientations=2)
    assert again.frames_encoded == other_window.frames_encoded


def test_the_cache_keeps_to_its_byte_limit_dropping_the_least_recently_used(model):
    features = model.encode_image(_input(model))
    size = features.nbytes
    cache = FeatureCache(2 * size + size // 2)
    for key in ("a", "b"):
        cache.put(key, features)
    assert cache.get("a") is features  # "b" is now the least recently used
    cache.put("c", features)
    assert cache.get("b") is None
    assert cache.get("a") is features and cache.get("c") is features
    assert cache.nbytes == 2 * size <= cache.max_bytes
    FeatureCache(size - 1).put("too big", features)  # never stored, never raises
    assert len(FeatureCache(size - 1)) == 0


def _input(model):
    import torch

    side = model.config.image_size
    return torch.zeros(1, 3, side, side)
