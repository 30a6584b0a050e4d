"""Shared test settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# The suite runs tiny models, for which extra threads only add synchronisation cost; on a loaded 2-core
# machine they made the tests 20x slower. MEDSAM2_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("MEDSAM2_TEST_THREADS", "1")))


# Official key names and shapes of the 8 SAM 2 / 2.1 presets, measured by instantiating the official configs
# (a copy of shared/reference/sam2-keys.json, so that the suite needs nothing outside the repository).
SAM2_KEYS_FILE = Path(__file__).parent / "data" / "sam2-keys.json"


@pytest.fixture(scope="session")
def sam2_keys() -> dict:
    return json.loads(SAM2_KEYS_FILE.read_text())


# The evaluation, extent and corrections tests' tiny box-tracking model and generated volume (a test module may
# define its own fixture of the same name, which then takes precedence).
@pytest.fixture(scope="module")
def model():
    from golden import box_tracking_model

    return box_tracking_model()


@pytest.fixture(scope="module")
def volume():
    from golden import generated_held_out_volume
    from heldout_fixtures import X, Y, Z

    return generated_held_out_volume((Z, Y, X))


# The tiny random-weight SAM 2.1 model of the golden files with its presence head shifted so that every tracked
# frame is "present": without a bound, an object runs on through a whole volume.
@pytest.fixture(scope="module")
def present_model():
    from golden import golden_model

    return golden_model(presence_shift=5.0)
