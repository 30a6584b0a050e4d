"""The held-out evaluation of medsam2-lite (``medsam2.train.evaluate``) on generated data and a tiny model.

The tiny random-weight SAM 2.1 model of the golden files gets a tracking box margin, as medsam2-lite has;
the evaluation's plumbing (methods (i)-(v), the tables, the TotalSegmentator reader) is what is checked here.
The real figures come from ``medsam2 train evaluate`` and are recorded in BENCHMARKS.md.
"""

from __future__ import annotations

import io
import math
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from heldout_fixtures import X, Y, Z

from medsam2.preprocess import prepare_intensities
from medsam2.train import evaluate as ev
from medsam2.train import extent, report
from medsam2.train import heldout as ho


def test_previous_box_chain_starts_on_the_prompt_and_stops_at_the_first_empty_slice(model, volume):
    slices = ev.AxialSlices(model, prepare_intensities(volume.image, modality="ct"))
    start, box = ev.box_on_largest_slice(volume.mask("organ"))
    result = ev.previous_box_chain(slices, start, box)
    assert result.shape == (Z, Y, X)
    filled = result.any(axis=(1, 2))
    for direction in (range(start + 1, Z), range(start - 1, -1, -1)):
        seen_empty = False
        for z in direction:
            assert not (seen_empty and filled[z]), f"slice {z} was segmented after the chain stopped"
            seen_empty |= not filled[z]


def test_reference_boxes_touch_only_slices_where_the_structure_is(model, volume):
    slices = ev.AxialSlices(model, prepare_intensities(volume.image, modality="ct"))
    reference = volume.mask("organ")
    reference[0] = reference[-1] = False
    result = ev.reference_box_every_slice(slices, reference)
    assert not result[0].any() and not result[-1].any()


def test_shared_encoder_encodes_each_image_once_and_restores_the_model(model):
    images = torch.rand(1, 3, model.image_size, model.image_size)
    direct = model.encode_image(images).embedding
    with ev.shared_encoder(model) as stats:
        first = model.encode_image(images).embedding
        again = model.encode_image(images.clone()).embedding
        model.encode_image(torch.rand_like(images))
    assert stats == {"encoded": 2, "reused": 1}
    torch.testing.assert_close(first, direct)
    assert again is first
    assert "encode_image" not in vars(model)


def test_shared_encoder_serves_models_with_equal_encoder_weights_from_one_cache(model):
    import copy

    twin, other = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        next(other.image_encoder.parameters()).add_(1.0)
    images = torch.rand(1, 3, model.image_size, model.image_size)
    with ev.shared_encoder(model, twin, other, model) as stats:
        first = model.encode_image(images).embedding
        assert twin.encode_image(images).embedding is first
        own = other.encode_image(images).embedding
    assert stats == {"encoded": 2, "reused": 1}
    assert not torch.equal(own, first)
    assert all("encode_image" not in vars(m) for m in (model, twin, other))


def test_evaluate_volume_scores_every_method_and_structure(model, volume):
    result = ev.evaluate_volume(model, volume, log=lambda message: None)
    scores = result["scores"]["organ"]
    assert list(scores) == list(ev.METHODS)
    for method, s in scores.items():
        assert 0.0 <= s["dice"] <= 1.0, method
        assert s["hd95_mm"] >= 0 or math.isinf(s["hd95_mm"]), method
    assert set(result["seconds"]) == set(ev.METHODS)
    assert result["encoder"]["reused"] > 0  # (ii) and (iii) visit slices that (i) encoded
    effect = result["extra_axes"]["organ"]
    assert set(effect) == {"true_removed", "false_removed", "true_added", "false_added"}
    assert all(isinstance(n, int) and n >= 0 for n in effect.values())


def test_structures_are_segmented_together_in_the_window_they_are_read_in(model, volume, monkeypatch):
    both = ho.HeldOutVolume(
        "generated", volume.image, volume.spacing, "ct", volume.labels, {"organ": 3, "right lung": 3}
    )
    calls = []

    def recording(*args, **kwargs):
        calls.append((kwargs["window"], len(args[2])))
        return segment_volume(*args, **kwargs)

    segment_volume = ev.segment_volume
    monkeypatch.setattr(ev, "segment_volume", recording)
    result = ev.evaluate_volume(model, both, log=lambda message: None)
    assert result["windows"] == {"organ": None, "right lung": "lung"}
    # Methods (i)-(iii) once per window, each with that window's one structure.
    assert calls == [(None, 1)] * 3 + [("lung", 1)] * 3
    for name in ("organ", "right lung"):
        assert list(result["scores"][name]) == list(ev.METHODS)
    # The lung window shows this soft-tissue organ differently: its reference-box answer differs.
    assert result["scores"]["organ"] != result["scores"]["right lung"]


def test_summary_names_the_structures_where_memory_loses():
    reference = np.zeros((6, 4, 4), bool)
    reference[1:5, 1:3, 1:3] = True
    exact = extent.extent_errors(reference, reference)

    def scores(i, iv):
        return {
            m: {"dice": d, "hd95_mm": 1.0, "extent": exact}
            for m, d in zip(ev.METHODS, (i, 0.5, 0.5, iv, 0.9))
        }

    results = {
        "volumes": {
            "A": {"scores": {"liver": scores(0.8, 0.7), "spleen": scores(0.4, 0.6)}, "seconds": {}},
        }
    }
    summary = ev.summarize(results)
    assert summary["mean_dice"][ev.METHODS[0]] == pytest.approx(0.6)
    assert summary["i_minus_iv"] == {"A: liver": pytest.approx(0.1), "A: spleen": pytest.approx(-0.2)}
    assert summary["i_loses_on"] == ["A: spleen"]
    results["volumes"]["A"]["seconds"] = {m: 1.0 for m in ev.METHODS}
    results["volumes"]["A"]["references"] = {
        n: {"ml": 1.0, "first": 1, "last": 4} for n in ("liver", "spleen")
    }
    results["summary"] = summary
    table = report.markdown(results)
    assert "| A | spleen | 0.400 / 1.0 |" in table and "**0.600**" in table
    assert summary["mean_dice_by_volume"]["A"][ev.METHODS[3]] == pytest.approx(0.65)
    assert "| A | mean Dice | 0.600 | 0.500 | 0.500 | 0.650 | 0.900 |" in table


def test_evaluate_runs_only_the_parts_asked_for(tmp_path):
    with pytest.raises(ValueError, match="unknown evaluation part"):
        ev.evaluate(tmp_path / "none.safetensors", tmp_path, only=["Nowhere"])


def _nifti_bytes(array: np.ndarray, folder: Path, spacing=3.0, origin=(0.0, 0.0, 0.0)) -> bytes:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((spacing,) * 3)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(folder / "written.nii.gz"))
    return (folder / "written.nii.gz").read_bytes()


def _chest_ct_members(folder: Path) -> dict[str, bytes]:
    """The chest CT at 1.5 mm (8 voxels a side); the heart on its grid (the first 4 voxels of each axis),
    the aorta on a crop of 2 voxels a side from 6 mm on; the other two structures empty; a small structure,
    the annulus, inside the heart (its first 2 voxels of each axis)."""
    heart = np.zeros((8, 8, 8), np.uint8)
    heart[:4, :4, :4] = 1
    members = {
        ho._CHEST_CT: _nifti_bytes(np.full((8, 8, 8), 40, np.int16), folder, spacing=1.5),
        ho._CHEST_CT_MASKS["heart"]: _nifti_bytes(heart, folder, spacing=1.5),
        ho._CHEST_CT_MASKS["aorta"]: _nifti_bytes(np.ones((2, 2, 2), np.uint8), folder, 1.5, (6.0,) * 3),
    }
    for name in ("pulmonary_artery", "vertebrae_T12"):
        members[ho._CHEST_CT_MASKS[name]] = _nifti_bytes(np.zeros((8, 8, 8), np.uint8), folder, spacing=1.5)
    annulus = np.zeros((8, 8, 8), np.uint8)
    annulus[:2, :2, :2] = 1
    members[ho._CHEST_CT_MASKS["annulus_proper"]] = _nifti_bytes(annulus, folder, spacing=1.5)
    return {ho.TOTALSEG_FILES + name: data for name, data in members.items()}


def test_totalsegmentator_volumes_are_read_from_the_sdist_with_their_class_names(tmp_path, monkeypatch):
    monkeypatch.setitem(ho.STRUCTURES, "TotalSegmentator CT", ("liver",))
    monkeypatch.setitem(ho.STRUCTURES, "TotalSegmentator MR", ("spleen",))
    monkeypatch.setitem(ho.SMALL_STRUCTURES, "TotalSegmentator CT", ("spleen",))
    monkeypatch.delitem(ho.SMALL_STRUCTURES, "TotalSegmentator MR")
    monkeypatch.setitem(ho.SMALL_STRUCTURES, "TotalSegmentator chest CT", ("annulus_proper",))
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1:3, 1:4, 2:5] = 5
    labels[0, 0, 0] = 1
    members = {
        ho.TOTALSEG_CLASSES: b"x = 1\nclass_map = {'total': {1: 'spleen', 5: 'liver'}, "
        b"'total_mr': {1: 'spleen', 5: 'liver'}}\n",
        ho.TOTALSEG_FILES + "example_ct_sm.nii.gz": _nifti_bytes(
            np.arange(120, dtype=np.int16).reshape(4, 5, 6), tmp_path
        ),
        ho.TOTALSEG_FILES + "example_seg.nii.gz": _nifti_bytes(labels, tmp_path),
        ho.TOTALSEG_FILES + "example_mr_sm.nii.gz": _nifti_bytes(np.ones((4, 5, 6), np.int16), tmp_path),
        ho.TOTALSEG_FILES + "example_seg_mr.nii.gz": _nifti_bytes(labels, tmp_path),
        **_chest_ct_members(tmp_path),
    }
    with tarfile.open(tmp_path / ho.TOTALSEG_SDIST, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    ct, mr, chest = ho._totalsegmentator(tmp_path / ho.TOTALSEG_SDIST)
    assert ct.structures == {"liver": 5} and mr.structures == {"spleen": 1}
    assert ct.mask("liver").sum() == 2 * 3 * 3 and mr.mask("spleen").sum() == 1
    # A small structure is the label map's own mask, in a group of its own.
    assert list(ct.small) == ["spleen"] and np.argwhere(ct.mask("spleen")).tolist() == [[0, 0, 0]]
    assert mr.small == {}
    assert ct.image.shape == (4, 5, 6) and ct.spacing == (3.0, 3.0, 3.0) and ct.modality == "ct"
    # The chest CT is resampled to 3 mm, and each mask lands where it lies in mm, the crop's included.
    assert chest.image.shape == (4, 4, 4) and chest.spacing == (3.0, 3.0, 3.0) and chest.modality == "ct"
    np.testing.assert_allclose(chest.image, 40.0)
    assert list(chest.structures) == ["heart", "aorta", "pulmonary_artery", "vertebrae_T12"]
    assert np.argwhere(chest.mask("heart")).tolist() == [
        [z, y, x] for z in (0, 1) for y in (0, 1) for x in (0, 1)
    ]
    assert np.argwhere(chest.mask("aorta")).tolist() == [[2, 2, 2]]
    assert not chest.mask("pulmonary_artery").any()
    # The small annulus keeps its voxel inside the heart, and the heart keeps it too.
    assert list(chest.small) == ["annulus_proper"]
    assert np.argwhere(chest.mask("annulus_proper")).tolist() == [[0, 0, 0]]
    assert [v.name for v in ho.held_out_volumes(tmp_path)][1:] == [
        "TotalSegmentator CT",
        "TotalSegmentator MR",
        "TotalSegmentator chest CT",
    ]
    assert ho.held_out_names(tmp_path) == [v.name for v in ho.held_out_volumes(tmp_path)]
    assert [v.name for v in ho.held_out_volumes(tmp_path, ["TotalSegmentator MR"])] == ["TotalSegmentator MR"]


_KILLED_PARENT = """
import multiprocessing, os, sys
from concurrent.futures import ProcessPoolExecutor
from medsam2.train.evaluate import exit_with_parent

if __name__ == "__main__":
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(1, mp_context=context, initializer=exit_with_parent, initargs=(os.getpid(), 0.1))
    print(pool.submit(os.getpid).result(), flush=True)
    os.kill(os.getpid(), 9)  # no clean-up of any kind: the worker is left running
"""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has ended; only its exit status waits to be collected


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_pool_workers_end_when_the_evaluation_process_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(_KILLED_PARENT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    worker = int(done.stdout.split()[0])
    deadline = time.monotonic() + 15
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(worker)


def test_the_2d_one_prompt_setting_segments_ct_and_mr_slices_from_one_ct_box(model, volume):
    """Both volumes of the setting are needed; each shared structure gets rows for other CT slices (not the
    template's) and MR slices, with the memory's Dice and the scaled template box's."""
    from dataclasses import replace

    from medsam2.train.one_prompt import one_prompt_2d

    ct, mr = (replace(volume, name=name) for name in ho.ONE_PROMPT_VOLUMES)
    assert one_prompt_2d(model, [ct]) == {}
    rows = one_prompt_2d(model, [ct, mr], images_per_volume=2)["organ"]
    assert [r["source"] for r in rows] == ["CT", "CT", "MR", "MR"]
    for row in rows:
        assert 0.0 <= row["one_prompt_dice"] <= 1.0 and 0.0 <= row["template_box_dice"] <= 1.0
