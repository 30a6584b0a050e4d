"""``pipeline="upstream"`` against golden files made with bowang-lab's MedSAM2 code (their video predictor and
the steps of their 3D inference scripts) on the same random SAM 2.1 tiny weights at 512 px.

scripts/oracle/make_upstream_golden.py made the files and says what had to stand in for what on a CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from upstream_golden import SAM21_TINY, golden_case, random_weights

import medsam2
from medsam2.session import fill_holes
from medsam2.upstream import UpstreamFrames, _largest_component, upstream_intensities

MIN_AGREEMENT = 0.995


@pytest.fixture(scope="module")
def model(sam2_keys) -> medsam2.SAM2Model:
    model = medsam2.build_model(medsam2.ModelConfig.preset("sam2.1_hiera_t", image_size=512))
    model.load_state_dict(random_weights(sam2_keys[SAM21_TINY]["keys"]), strict=True)
    return model.eval()


@pytest.mark.parametrize("case", ["ct", "mr"])
def test_intensities_and_model_input_are_upstream_exactly(model, case):
    meta, golden = golden_case(case)
    window = None if meta["window"] is None else tuple(meta["window"])
    prepared = upstream_intensities(golden["volume"], meta["modality"], window)
    np.testing.assert_array_equal(prepared, golden["prepared"])
    frame = UpstreamFrames(prepared, model.config).model_input(meta["prompt"]["index"], model.device)
    np.testing.assert_allclose(frame[0, :, 192:256, 224:288].numpy(), golden["model_input_crop"], atol=1e-6)


@pytest.mark.parametrize("case", ["ct", "mr"])
def test_upstream_pipeline_matches_bowang_lab_medsam2(model, case):
    meta, golden = golden_case(case)
    p = meta["prompt"]
    result = medsam2.segment_volume(
        model,
        golden["volume"],
        [
            medsam2.Prompt(
                axis=0, index=p["index"], box=p.get("box"), points=p.get("points"), labels=p.get("labels")
            )
        ],
        modality=meta["modality"],
        window=None if meta["window"] is None else tuple(meta["window"]),
        pipeline="upstream",
    )
    ours, theirs = result.labels == 1, golden["mask"] == 1
    assert 0.05 < theirs.mean() < 0.95  # a mask with edges to get wrong, not an empty or a full volume
    assert np.mean(ours == theirs) >= MIN_AGREEMENT


def test_each_direction_matches_the_oracle_logits(model):
    """The sharper check behind the mask agreement: forward and reverse logits of every slice, before the
    union and the largest component (measured: at most 0.002 apart, the float16 rounding of the files)."""
    meta, golden = golden_case("ct")
    p = meta["prompt"]
    frames = UpstreamFrames(golden["prepared"], model.config)
    session = medsam2.Session(model, frames, memory=medsam2.MemoryOptions(policy="recent"), fill_hole_area=8)
    for reverse, key in ((False, "forward_logits"), (True, "reverse_logits")):
        session.reset()
        session.add_prompt(p["index"], box=p["box"])
        for t, out in session.propagate(start=p["index"], reverse=reverse):
            np.testing.assert_allclose(
                out[1], golden[key][t].astype(np.float32), atol=0.05, err_msg=f"{key} {t}"
            )


def test_small_holes_are_filled_as_in_sam2():
    logits = torch.full((1, 1, 12, 12), 3.0)
    logits[0, 0, 2:4, 2:6] = -1.0  # 8 px inside: filled
    logits[0, 0, 7:10, 7:10] = -1.0  # 9 px: kept
    logits[0, 0, 0, 10:12] = -1.0  # 2 px at the border: filled too, as in SAM 2
    filled = fill_holes(logits, 8)
    assert torch.all(filled[0, 0, 2:4, 2:6] == 0.1) and torch.all(filled[0, 0, 0, 10:12] == 0.1)
    assert torch.all(filled[0, 0, 7:10, 7:10] == -1.0)
    assert torch.equal(filled[logits > 0], logits[logits > 0])


def test_only_the_largest_26_connected_component_is_kept():
    mask = np.zeros((6, 10, 10), bool)
    mask[0:3, 0:3, 0:3] = True  # 27 voxels
    mask[3, 3, 3] = True  # touches the first only at a corner: 26-connected to it
    mask[4:6, 6:9, 6:9] = True  # 18 voxels, apart
    kept = _largest_component(mask)
    assert kept.sum() == 28 and not kept[4:, 6:, 6:].any()
