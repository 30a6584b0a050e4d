"""The ``medsam2`` command line, run in-process on slicerio's chest CT with a tiny random-weight checkpoint."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import medsam2
from medsam2 import bench, io, metrics, models
from medsam2.cli import main
from medsam2.cli_inputs import PromptArgs, volume_prompts, world_to_index

slicerio = pytest.importorskip("slicerio")
DATA = Path(slicerio.__file__).parent / "data"
CT = DATA / "CTChest4.nrrd"  # 34 x 128 x 128, int32 HU
SEGMENTATION = DATA / "Segmentation.seg.nrrd"  # 7 segments on the CT's grid
GOLDEN_META = Path(__file__).parent / "data" / "golden" / "sam2.1" / "meta.json"
# The last three axial slices: forward tracking from slice 31 visits 3 frames, which keeps every run short.
LAST_SLICES = ["--slice", "31", "--orientations", "1"]


def _tiny_fields() -> dict:
    return json.loads(GOLDEN_META.read_text())["config"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    """``--model`` / ``--config`` options of a tiny SAM 2.1 model with random weights, saved by the test."""
    folder = tmp_path_factory.mktemp("model")
    fields = _tiny_fields()
    config_file = folder / "tiny.json"
    config_file.write_text(json.dumps(fields))
    config = medsam2.ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    torch.manual_seed(0)
    checkpoint = medsam2.save_state_dict(medsam2.build_model(config), folder / "tiny.safetensors")
    return ["--model", str(checkpoint), "--config", str(config_file), "--device", "cpu"]


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    k = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    angle = math.radians(degrees)
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def _write(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(tuple(np.asarray(direction).ravel()))
    sitk.WriteImage(image, str(path))
    return path


# ---------------------------------------------------------------------------------------------- segment


def test_segment_writes_labels_on_the_ct_grid(tiny, tmp_path, capsys):
    out = tmp_path / "out.seg.nrrd"
    code, stdout, err = run(["segment", CT, "-o", out, "--box", "40,40,90,90", *LAST_SLICES, *tiny], capsys)
    assert code == 0, err
    assert "3 frames" in stdout and str(out) in stdout
    labels = io.read_labels(out)
    ct = io.read_image(CT)
    assert labels.array.shape == ct.array.shape
    np.testing.assert_allclose(labels.image.spacing, ct.spacing)
    np.testing.assert_allclose(labels.image.origin, ct.origin)
    assert set(np.unique(labels.array)) <= {0, 1}
    # orientations=1 forward from slice 31: nothing can be found before the prompted slice
    assert not labels.array[:31].any()


def test_pipeline_upstream_runs_bowang_labs_inference(tiny, tmp_path, capsys):
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(CT)))[28:34, 30:94, 20:100].astype(np.int16)
    source, out = _write(array, tmp_path / "small.nrrd"), tmp_path / "up.nrrd"
    code, _, err = run(["segment", source, "-o", out, "--slice", "3", "--box", "20,10,60,50", "--pipeline",
                        "upstream", "--window", "40,400", *tiny], capsys)  # fmt: skip
    assert code == 0, err
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in _tiny_fields().items()}
    model = medsam2.load_model(tiny[1], config=medsam2.ModelConfig(**fields), device="cpu")
    expected = medsam2.segment_volume(
        model,
        array,
        [medsam2.Prompt(axis=0, index=3, box=(20, 10, 60, 50))],
        window=(40, 400),
        pipeline="upstream",
    )
    assert expected.labels.any()
    np.testing.assert_array_equal(io.read_labels(out).array, expected.labels)


def test_absent_slices_bound_the_object(tiny, tmp_path, capsys):
    out = tmp_path / "bounded.nrrd"
    prompt = ["--box", "40,40,90,90", "--slice", "20", "--orientations", "2", *tiny]
    code, _, err = run(["segment", CT, "-o", out, *prompt, "--absent", "17", "--absent", "24"], capsys)
    assert code == 0, err
    found = np.flatnonzero(io.read_labels(out).array.any(axis=(1, 2)))
    assert found.size and found.min() >= 18 and found.max() <= 23


def test_threshold_and_obj_id_shape_the_label_map(tiny, tmp_path, capsys):
    default, strict = tmp_path / "default.nii.gz", tmp_path / "strict.nii.gz"
    prompt = ["--box", "40,40,90,90", *LAST_SLICES, "--obj-id", "3", *tiny]
    assert run(["segment", CT, "-o", default, *prompt], capsys)[0] == 0
    assert run(["segment", CT, "-o", strict, "--threshold", "0.9", *prompt], capsys)[0] == 0
    a, b = io.read_labels(default).array, io.read_labels(strict).array
    assert set(np.unique(a)) <= {0, 3} and a.any()
    assert np.all(b <= a) and b.sum() < a.sum()  # a higher cut-off keeps a strict subset


def test_oblique_nifti_round_trip_keeps_the_exact_geometry(tiny, tmp_path, capsys):
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(CT)))[28:34, 30:94, 20:100].astype(np.int16)
    source = _write(
        array,
        tmp_path / "oblique.nii.gz",
        spacing=(0.8, 1.1, 2.5),
        origin=(-31.25, 12.5, 104.0),
        direction=_rotation((1, 2, 3), 27.0),
    )
    out = tmp_path / "seg.nii.gz"
    code, _, err = run(["segment", source, "-o", out, "--slice", "4", "--point", "40,30", "--orientations", "1",
                        *tiny], capsys)  # fmt: skip
    assert code == 0, err
    given, written = sitk.ReadImage(str(source)), sitk.ReadImage(str(out))
    assert written.GetSize() == given.GetSize()
    assert written.GetOrigin() == given.GetOrigin()
    assert written.GetSpacing() == given.GetSpacing()
    assert written.GetDirection() == given.GetDirection()
    assert not np.allclose(np.reshape(given.GetDirection(), (3, 3)), np.eye(3))


def test_world_coordinates_give_the_voxel_prompt_on_an_oblique_grid():
    direction = _rotation((0.3, -1, 2), 33.0)
    image = io.Image.from_array(
        np.arange(6 * 20 * 30, dtype=np.int16).reshape(6, 20, 30),
        spacing=(0.7, 1.3, 2.9),
        origin=(-12.5, 30.25, 101.0),
        direction=direction,
    )
    physical = image.to_sitk(image.array).TransformContinuousIndexToPhysicalPoint
    point = physical((12.0, 7.0, 3.0))  # (i, j, k)
    np.testing.assert_allclose(world_to_index(image, point), (12.0, 7.0, 3.0), atol=1e-9)

    args = PromptArgs(points=[",".join(map(str, point)) + ",0"], world=True)
    (axial,) = volume_prompts(args, image)
    assert (axial.axis, axial.index) == (0, 3)
    np.testing.assert_allclose(axial.points, [[12.0, 7.0]], atol=1e-9)
    assert axial.labels.tolist() == [0]

    corners = [physical((4.0, 2.0, 1.8)), physical((20.0, 15.0, 2.2))]
    args = PromptArgs(box=",".join(map(str, [*corners[0], *corners[1]])), world=True, axis="sagittal")
    (sagittal,) = volume_prompts(args, image)
    # sagittal slices are volume[:, :, i]: the box centre's i picks the slice, (j, k) are (column, row)
    assert (sagittal.axis, sagittal.index) == (2, 12)
    np.testing.assert_allclose(sagittal.box, [2.0, 1.8, 15.0, 2.2], atol=1e-9)


def test_mask_prompt_from_a_segmentation_volume(tiny, tmp_path, capsys):
    out = tmp_path / "lung.nrrd"
    code, stdout, err = run(
        ["segment", CT, "-o", out, "--mask", SEGMENTATION, "--mask-label", "5", "--slice", "32",
         "--orientations", "1", *tiny],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "2 frames" in stdout  # slices 32 and 33


# ------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(CT)))
    nan = ct[:4, :16, :16].astype(np.float32)
    nan[1, 2, 3] = np.nan
    vector = sitk.GetImageFromArray(np.zeros((4, 8, 8, 3), np.float32), isVector=True)
    sitk.WriteImage(vector, str(folder / "vector.nrrd"))
    four_d = sitk.JoinSeries([sitk.GetImageFromArray(ct[:3, :8, :8])] * 2)
    sitk.WriteImage(four_d, str(folder / "4d.nii.gz"))
    (folder / "junk.nii.gz").write_bytes(b"this is not an image")
    empty_mask = np.zeros(ct.shape, np.uint8)
    empty_mask[5, 60:70, 60:70] = 1
    return {
        "slice2d": _write(ct[10], folder / "slice.nrrd"),
        "nan": _write(nan, folder / "nan.nrrd"),  # ITK reads NaN in NIfTI as 0
        "constant": _write(np.full((4, 8, 8), 7, np.int16), folder / "constant.nrrd"),
        "vector": folder / "vector.nrrd",
        "4d": folder / "4d.nii.gz",
        "junk": folder / "junk.nii.gz",
        "small_mask": _write(np.ones((4, 8, 8), np.uint8), folder / "small_mask.nrrd"),
        "empty_mask": _write(empty_mask, folder / "empty_mask.nrrd"),
    }


BAD_INPUTS = {
    "slice outside": (["--slice", "34", "--box", "1,1,9,9"], "Prompt slice 34 is outside the volume"),
    "point outside": (["--slice", "3", "--point", "200,10"], "lies outside the axial slice"),
    "box outside": (["--slice", "3", "--box", "130,130,140,140"], "lies outside the axial slice"),
    "world point outside": (["--world", "--point", "0,0,500"], "lies outside the image"),
    "empty box": (["--slice", "3", "--box", "50,50,50,60"], "is empty"),
    "bad box": (["--slice", "3", "--box", "1,2,3"], "--box needs 4 comma-separated numbers"),
    "bad label": (["--slice", "3", "--point", "5,5,2"], "label is 1 (include) or 0 (exclude)"),
    "no slice": (["--box", "1,1,9,9"], "Give --slice K"),
    "no prompt": (["--slice", "3"], "Give a prompt"),
    "absent outside": (["--slice", "3", "--box", "1,1,9,9", "--absent", "40"], "Prompt slice 40 is outside"),
    "absent on the prompt": (
        ["--slice", "3", "--box", "1,1,9,9", "--absent", "3"],
        "both prompted and marked",
    ),
    "mask and box": (["--mask", "{small_mask}", "--box", "1,1,9,9"], "either --mask or --point/--box"),
    "mask shape": (["--mask", "{small_mask}"], "has shape (4, 8, 8) but the image has (34, 128, 128)"),
    "empty mask": (["--mask", "{empty_mask}", "--slice", "6"], "has no non-zero voxel on axial slice 6"),
    "unknown model": (
        ["--slice", "3", "--box", "1,1,9,9", "--model", "nonesuch"],
        "Unknown model 'nonesuch'",
    ),
    "bad window": (["--slice", "3", "--box", "1,1,9,9", "--window", "liverish"], "Unknown window 'liverish'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_prompt_or_option_is_refused_without_output(case, bad_files, tmp_path, capsys):
    extra, message = BAD_INPUTS[case]
    extra = [a.format(**bad_files) for a in extra]
    out = tmp_path / "out.nii.gz"
    code, stdout, err = run(["segment", CT, "-o", out, *extra], capsys)
    _assert_refused(code, err, message, tmp_path)
    assert stdout == ""


BAD_VOLUMES = {
    "slice2d": "is a 2D image",
    "nan": "NaN or infinite voxels",
    "constant": "has the same intensity (7) in every voxel",
    "vector": "has 3 components per voxel",
    "4d": "is a 4D image",
    "junk": "Cannot read",
}


@pytest.mark.parametrize("case", list(BAD_VOLUMES))
def test_unusable_volume_is_refused_without_output(case, bad_files, tmp_path, capsys):
    out = tmp_path / "out.nii.gz"
    code, _, err = run(["segment", bad_files[case], "-o", out, "--slice", "1", "--box", "1,1,5,5"], capsys)
    _assert_refused(code, err, BAD_VOLUMES[case], tmp_path)


def test_missing_file_bad_suffix_and_usage_errors(tmp_path, capsys):
    code, _, err = run(["segment", tmp_path / "nope.nrrd", "-o", tmp_path / "o.nrrd", "--slice", "1",
                        "--box", "1,1,5,5"], capsys)  # fmt: skip
    _assert_refused(code, err, "No such file or folder", tmp_path)
    code, _, err = run(["segment", CT, "-o", tmp_path / "o.txt", "--slice", "1", "--box", "1,1,5,5"], capsys)
    _assert_refused(code, err, "must end with one of .seg.nrrd", tmp_path)
    code, _, err = run(["segment", CT, "-o", tmp_path / "o.nrrd", "--orientations", "3"], capsys)
    _assert_refused(code, err, "invalid choice: 3", tmp_path)


def test_model_file_that_is_not_a_checkpoint(tmp_path, capsys):
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"definitely not a checkpoint")
    out = tmp_path / "out.nrrd"
    code, _, err = run(
        ["segment", CT, "-o", out, "--slice", "3", "--box", "1,1,9,9", "--model", fake], capsys
    )
    _assert_refused(code, err, "cannot be read as safetensors", tmp_path, keep={"fake.safetensors"})


def _assert_refused(code: int, err: str, message: str, folder: Path, keep=frozenset()) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert message in lines[0]
    assert {p.name for p in folder.iterdir()} == set(keep)  # no output, no temporary file


# ----------------------------------------------------------------------------------------------- images


def test_images_writes_one_mask_per_image(tiny, tmp_path, capsys):
    folder = tmp_path / "pictures"
    folder.mkdir()
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(CT)))
    grey = lambda a: (np.clip((a + 160) / 400, 0, 1) * 255).astype(np.uint8)  # noqa: E731
    sizes = {"a.png": (96, 80), "b.png": (64, 64), "c.jpg": (50, 70)}
    for (name, (h, w)), z in zip(sizes.items(), (12, 16, 20)):
        sitk.WriteImage(sitk.GetImageFromArray(grey(ct[z, :h, :w])), str(folder / name))
    out = tmp_path / "masks"
    code, stdout, err = run(
        ["images", folder, "-o", out, "--template", "b.png", "--box", "10,10,50,50", "--memory", "recent",
         "--preview", tmp_path / "sheet.png", *tiny],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "3 masks written" in stdout
    for name, size in sizes.items():
        mask = io.read_2d_image(out / (Path(name).stem + ".png"))
        assert mask.shape == size and set(np.unique(mask)) <= {0, 255}
    assert io.read_2d_image(tmp_path / "sheet.png").shape[2] == 3

    code, _, err = run(["images", folder, "-o", tmp_path / "m2", "--template", "b", "--point", "80,10", *tiny],
                       capsys)  # fmt: skip
    assert code == 2 and "lies outside the template (64 x 64 pixels)" in err
    assert not (tmp_path / "m2").exists()
    code, _, err = run(["images", folder, "-o", tmp_path / "m3", "--template", "z.png", "--box", "1,1,4,4"],
                       capsys)  # fmt: skip
    assert code == 2 and "'z.png' is not among the images" in err


# --------------------------------------------------------------------------------------------- evaluate


def test_evaluate_matches_the_metrics_module(tmp_path, capsys):
    reference = io.read_labels(SEGMENTATION)
    predicted = np.roll(reference.array, shift=(1, 2), axis=(0, 2))
    predicted[predicted == 2] = 0  # one label missing altogether: HD95 is infinite
    pred_file = tmp_path / "pred.nii.gz"
    io.write_labels(predicted, reference.image, pred_file)
    spacing = reference.image.spacing_zyx
    expected = metrics.per_label_table(predicted, reference.array, spacing, labels=[1, 2, 5])

    out = tmp_path / "scores.json"
    code, _, err = run(["evaluate", pred_file, SEGMENTATION, "--labels", "1", "2", "5", "--format", "json",
                        "-o", out], capsys)  # fmt: skip
    assert code == 0, err
    rows = json.loads(out.read_text())["labels"]
    assert [r["label"] for r in rows] == [1, 2, 5]
    assert [r["name"] for r in rows] == ["ribs", "cervical vertebral column", "right lung"]
    for row, want in zip(rows, expected):
        assert row["dice"] == pytest.approx(want["dice"], abs=1e-12)
        assert row["iou"] == pytest.approx(want["iou"], abs=1e-12)
        assert row["pred_ml"] == pytest.approx(want["pred_ml"])
        if math.isinf(want["hd95"]):
            assert row["hd95"] is None
        else:
            assert row["hd95"] == pytest.approx(want["hd95"], abs=1e-9)
    assert 0 < rows[0]["dice"] < 1 and rows[1]["dice"] == 0.0

    code, stdout, _ = run(["evaluate", pred_file, SEGMENTATION, "--format", "csv"], capsys)
    lines = stdout.splitlines()
    assert code == 0 and lines[0].startswith("label,name,dice,iou,hd95") and len(lines) == 1 + 7
    lung = next(line.split(",") for line in lines[1:] if line.startswith("5,"))
    assert float(lung[2]) == pytest.approx(expected[2]["dice"])

    code, stdout, _ = run(["evaluate", pred_file, SEGMENTATION], capsys)
    assert code == 0 and "right lung" in stdout and f"{expected[2]['dice']:.4f}" in stdout


def test_evaluate_refuses_another_grid_unless_resampling(tmp_path, capsys):
    reference = io.read_labels(SEGMENTATION)
    shifted = io.Image.from_array(
        reference.array,
        spacing=reference.image.spacing,
        origin=tuple(np.add(reference.image.origin, (0.0, 0.0, 10.0))),  # one slice up
        direction=reference.image.direction,
    )
    pred_file = tmp_path / "pred.nrrd"
    io.write_labels(reference.array, shifted, pred_file)
    code, _, err = run(["evaluate", pred_file, SEGMENTATION], capsys)
    assert code == 2 and "different grids (origin" in err and "--resample" in err
    code, stdout, _ = run(["evaluate", pred_file, SEGMENTATION, "--resample", "--format", "json"], capsys)
    rows = {r["label"]: r for r in json.loads(stdout)["labels"]}
    lung = reference.array == 6
    moved = np.zeros_like(lung)
    moved[1:] = lung[:-1]  # the prediction seen on the reference grid is one slice further
    assert code == 0 and rows[6]["dice"] == pytest.approx(metrics.dice(moved, lung))


# ----------------------------------------------------------------------------------------- models, bench


def test_models_lists_the_registry(capsys):
    code, stdout, _ = run(["models", "--json"], capsys)
    listed = json.loads(stdout)
    assert code == 0
    assert [m["name"] for m in listed["models"]] == models.names()
    lite = next(m for m in listed["models"] if m["name"] == "medsam2-lite")
    assert (lite["preset"], lite["image_size"]) == ("medsam2_lite", 256)
    latest = next(m for m in listed["models"] if m["name"] == "MedSAM2_latest")
    assert (latest["licence"], latest["digest"], latest["image_size"]) == ("CC-BY-SA-4.0", "unverified", 512)
    code, stdout, _ = run(["models"], capsys)
    assert code == 0 and all(name in stdout for name in models.names()) and "cache folder" in stdout


def test_bench_times_the_four_settings(tmp_path, capsys):
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(CT)))
    volume = _write(ct[14:18, 60:68, 30:38], tmp_path / "small.nrrd", spacing=(3.0, 3.0, 10.0))
    (tmp_path / "tiny.json").write_text(json.dumps(_tiny_fields()))
    code, stdout, err = run(
        ["bench", volume, "--slice", "1", "--box", "1,1,6,6", "--random", tmp_path / "tiny.json", "--device",
         "cpu", "--json", tmp_path / "b.json", "--markdown", tmp_path / "b.md"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "b.json").read_text())
    runs = {r["key"]: r for r in report["runs"]}
    assert list(runs) == ["a", "b", "c", "d"]
    assert runs["a"]["frames"] == 3  # slices 1..3 forward
    assert runs["b"]["frames"] == 3 + 2
    # (c) visits every slice of every axis, each pass from its seed slice both ways (that slice twice)
    assert runs["c"]["frames"] == (4 + 1) + (8 + 1) + (8 + 1)
    assert runs["c"]["frames_encoded"] == 4 + 8 + 8  # the seed slices are visited twice, encoded once
    assert runs["c"]["roi"] is None and runs["c"]["early_stop"] is False
    assert all(r["seconds"] > 0 and r["encoder_seconds"] > 0 for r in runs.values())
    assert runs["c"]["encoder_seconds"] > runs["a"]["encoder_seconds"]
    assert report["machine"]["torch"] == torch.__version__
    markdown = (tmp_path / "b.md").read_text()
    assert "| run | what | frames |" in markdown and report["machine"]["cpu"] in markdown
    assert "6 orientations, whole volume" in stdout


def test_bench_full_run_goes_on_where_the_default_stops_early():
    config = medsam2.ModelConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in _tiny_fields().items()}
    )
    torch.manual_seed(0)
    model = medsam2.build_model(config)
    with torch.no_grad():  # an object-score bias far below zero: the object is absent from every frame
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(-1e4)
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(CT)))[10:22, 60:68, 30:38]
    report = bench.run(model, volume, [medsam2.Prompt(axis=0, index=0, box=(1, 1, 6, 6))])
    frames = {m.case.key: m.frames for m in report.measurements}
    # early stop after 3 empty frames: 0, 1, 2 forward (+ frame 0 in reverse); run (c) visits all 12 (+1),
    # and with nothing found there is nothing to seed the other axes with
    assert frames == {"a": 3, "b": 4, "c": 13, "d": 4}
    assert all(m.voxels == 0 for m in report.measurements)


# ------------------------------------------------------------------------------------------ demo, train


def test_demo_and_train_forward_their_arguments(monkeypatch, capsys):
    seen = []
    fake = types.SimpleNamespace(main=lambda argv: seen.append(argv) or 0)
    monkeypatch.setitem(sys.modules, "medsam2.train", fake)
    assert main(["train", "--epochs", "2", "--help"]) == 0
    assert seen == [["--epochs", "2", "--help"]]

    monkeypatch.setitem(sys.modules, "medsam2.demo", None)  # as if the module were not installed
    code, _, err = run(["demo", "--quick"], capsys)
    assert code == 2 and err.strip() == "medsam2 demo: error: this installation has no medsam2.demo module"


def test_help_shows_examples(capsys):
    for command in ("segment", "images", "evaluate", "bench"):
        code, stdout, _ = run([command, "--help"], capsys)
        assert code == 0 and f"medsam2 {command} " in stdout.split("examples:")[1]
