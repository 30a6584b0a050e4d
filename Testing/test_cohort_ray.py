"""``medsam2 cohort`` on a real local Ray cluster (2 CPUs, loopback only, one per module), with the tiny
random-weight model of the parity tests, slicerio's chest CT and generated volumes: bad rows fail alone, a
worker killed mid-row has its row retried without duplicates, and a whole run killed and started again skips
its finished rows and ends with the same table."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from golden import golden_config

import medsam2
from medsam2 import io, metrics
from medsam2.cli import main
from medsam2.cohort import ModelChoice, Reporter, Resources, Settings, read_table, run_cohort
from medsam2.demo import box_on_largest_slice
from medsam2.errors import InputError

slicerio = pytest.importorskip("slicerio")
CONFIG = str(Path(__file__).parent / "data" / "golden" / "sam2.1" / "meta.json")  # the tiny configuration
CT = Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd"  # 34 x 128 x 128
SEGMENTATION = CT.with_name("Segmentation.seg.nrrd")  # 5: right lung, 6: left lung
HEADER = "image,structure,box,point,recist,slice,reference,reference_label,orientations"
LOOPBACK = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # read by Ray on import: "0" binds it to 127.0.0.1


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray instance for the module: 2 CPUs, no dashboard, on the loopback interface only."""
    saved = os.environ.get(LOOPBACK)
    os.environ[LOOPBACK] = "0"
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
        yield ray
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop(LOOPBACK, None)
        else:
            os.environ[LOOPBACK] = saved


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """The tiny model with random weights (seed 0: it finds objects everywhere, so outputs are not empty)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    return str(medsam2.save_state_dict(medsam2.build_model(golden_config()), path))


def _tiny(model: str) -> list[str]:
    return ["--model", model, "--config", CONFIG]


def _sphere(path: Path, centre=(12, 24, 24), radius=7, shape=(24, 48, 48), spacing=(1.0, 1.0, 1.0)) -> Path:
    """A bright ball in noise, written with its label map as ``<name>_ref.nrrd``; ``spacing`` is x, y, z."""
    grid = np.indices(shape)
    ball = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2
    noise = np.random.default_rng(len(path.name)).normal(0, 20, shape)
    for array, target in (
        (np.where(ball, 200, -50) + noise, path),
        (ball, path.with_name(path.name.split(".")[0] + "_ref.nrrd")),
    ):
        image = sitk.GetImageFromArray(array.astype(np.int16 if array.dtype != bool else np.uint8))
        image.SetSpacing(spacing)
        sitk.WriteImage(image, str(target))
    return path


def _table(folder: Path, lines: list[str]) -> Path:
    path = folder / "cohort.csv"
    path.write_text("\n".join([HEADER, *lines]) + "\n")
    return path


def _results(out: Path) -> list[dict[str, str]]:
    with (out / "results.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _lung_rows(orientations: int) -> list[str]:
    reference = io.read_labels(SEGMENTATION).array
    rows = []
    for label, name in ((5, "right lung"), (6, "left lung")):
        index, box = box_on_largest_slice(reference == label)
        box_text = ",".join(map(str, box))
        rows.append(f'{CT},{name},"{box_text}",,,{index},{SEGMENTATION},{label},{orientations}')
    return rows


def test_six_rows_with_two_bad_give_four_outputs_and_two_clear_errors(ray_cluster, model, tmp_path, capsys):
    _sphere(tmp_path / "ball.nii.gz")
    _sphere(tmp_path / "flat.nrrd", centre=(10, 24, 24), spacing=(0.5, 1.0, 2.0))
    (tmp_path / "broken.nii.gz").write_text("not an image")
    table = _table(
        tmp_path,
        [
            *_lung_rows(orientations=2),
            f'ball.nii.gz,ball,,"24,24",,12,{tmp_path / "ball_ref.nrrd"},1,2',
            'flat.nrrd,lesion,,,"20,22,30,26",10,,,2',
            'broken.nii.gz,liver,"1,1,5,5",,,1,,,2',
            f'{CT},outside,"130,10,140,20",,,10,,,2',  # segmented with the lungs: fails alone all the same
        ],
    )
    out = tmp_path / "out"
    code = main(["cohort", str(table), "--out", str(out), *_tiny(model), "--workers", "2"])
    stdout = capsys.readouterr().out
    assert code == 1
    assert "6 rows: 4 ok (0 finished earlier, skipped), 2 failed" in stdout

    results = {r["structure"]: r for r in _results(out)}
    assert [r["status"] for r in results.values()] == ["ok"] * 4 + ["failed"] * 2
    assert results["liver"]["error"].startswith(f"Cannot read {tmp_path / 'broken.nii.gz'} as an image")
    assert results["outside"]["error"] == (
        "The prompt box (130, 10, 140, 20) lies outside the axial slice (128 columns x 128 rows)"
    )
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted([*(results[s]["output"] for s in ("right lung", "left lung", "ball", "lesion")),
                              "records", "results.csv"])  # fmt: skip
    for structure, row in results.items():
        if row["status"] != "ok":
            assert row["output"] == "" and row["volume_ml"] == ""
            continue
        image = io.read_image(row["image"])
        labels = io.read_labels(out / row["output"])
        assert labels.array.shape == image.array.shape and labels.names == {1: structure}
        np.testing.assert_allclose(labels.image.spacing, image.spacing)
        np.testing.assert_allclose(labels.image.origin, image.origin)
        voxels = int((labels.array == 1).sum())
        assert float(row["volume_ml"]) == pytest.approx(voxels * np.prod(image.spacing) / 1000, abs=1e-4)
        assert row["device"] == "cpu" and row["attempts"] == "1" and float(row["seconds"]) > 0
    for structure, label in (("right lung", 5), ("left lung", 6)):
        predicted = io.read_labels(out / results[structure]["output"]).array == 1
        expected = metrics.dice(predicted, io.read_labels(SEGMENTATION).array == label)
        assert float(results[structure]["dice"]) == pytest.approx(expected, abs=1e-4)
    assert results["ball"]["dice"] != "" and results["lesion"]["dice"] == ""

    # The RECIST row's box, by hand: columns 0.5 mm, rows 1 mm; the line (20, 22)-(30, 26) spans 5 mm across
    # and 4 mm down, sqrt(41) mm long; half a side is sqrt(41) / 2 mm = 6.403 columns or 3.202 rows around
    # the midpoint (25, 24).
    half = math.sqrt(41) / 2
    (prompt,) = json.loads(results["lesion"]["prompt"])
    assert (prompt["axis"], prompt["slice"]) == ("axial", 10)
    np.testing.assert_allclose(
        prompt["box"], [25 - half / 0.5, 24 - half, 25 + half / 0.5, 24 + half], atol=1e-3
    )


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class _KillMidRow(Reporter):
    """Kills the worker that runs row ``target`` the first time, once it has spent 0.5 s of CPU on it."""

    def __init__(self, target: str, output: Path) -> None:
        self.target, self.output = target, output
        self.pids: list[int] = []
        self.killed: dict | None = None
        self.thread: threading.Thread | None = None

    def started(self, task, worker) -> None:
        if self.target in task.rows:
            self.pids.append(worker.pid)
            if self.thread is None:
                self.thread = threading.Thread(target=self._kill, args=(worker.pid,))
                self.thread.start()

    def _kill(self, pid: int) -> None:
        begin, deadline = _cpu_seconds(pid), time.monotonic() + 120
        while _cpu_seconds(pid) - begin < 0.5 and time.monotonic() < deadline:
            time.sleep(0.01)
        self.killed = {"cpu": _cpu_seconds(pid) - begin, "output_existed": self.output.exists()}
        os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads a worker's CPU time from /proc")
def test_a_worker_killed_mid_row_has_its_row_retried_on_another_worker_without_duplicates(
    ray_cluster, model, tmp_path
):
    _sphere(tmp_path / "a.nrrd")
    _sphere(tmp_path / "b.nrrd", centre=(12, 20, 28))
    table = _table(
        tmp_path,
        [_lung_rows(orientations=6)[0], 'a.nrrd,ball,,"24,24",,12,,,2', 'b.nrrd,ball,,"28,20",,12,,,2'],
    )
    out = tmp_path / "out"
    killer = _KillMidRow("CTChest4_right_lung", out / "CTChest4_right_lung.seg.nrrd")
    outcome = run_cohort(
        read_table(table),
        out,
        Settings(model=model),
        ModelChoice(config=golden_config()),
        Resources(workers=2, retries=1),
        reporter=killer,
    )
    killer.thread.join()
    assert killer.killed is not None and killer.killed["cpu"] >= 0.5 and not killer.killed["output_existed"]
    assert len(killer.pids) == 2 and killer.pids[0] != killer.pids[1]  # the retry ran in another process
    by_id = {r.id: r for r in outcome.records}
    assert by_id["CTChest4_right_lung"].status == "ok" and by_id["CTChest4_right_lung"].attempts == 2
    assert [by_id[i].attempts for i in ("a_ball", "b_ball")] == [1, 1]
    results = _results(out)
    assert [r["id"] for r in results] == ["CTChest4_right_lung", "a_ball", "b_ball"]
    assert all(r["status"] == "ok" for r in results)
    # one segmentation per row and nothing else: no second copy, no half-written file
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["CTChest4_right_lung.seg.nrrd", "a_ball.seg.nrrd", "b_ball.seg.nrrd", "records", "results.csv"]
    )
    assert sorted(p.name for p in (out / "records").iterdir()) == [f"{i}.json" for i in sorted(by_id)]


def _comparable(out: Path) -> list[dict[str, str]]:
    """The results without the time each row took (the one column two runs cannot share)."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in _results(out)]


def test_a_killed_run_restarted_skips_its_finished_rows_and_ends_with_the_same_table(
    ray_cluster, model, tmp_path, capsys
):
    lines = []
    for n in range(6):
        _sphere(tmp_path / f"v{n}.nrrd", centre=(12, 22 + n, 26 - n))
        lines.append(f'v{n}.nrrd,ball,,"{26 - n},{22 + n}",,12,,,2')
    table = _table(tmp_path, lines)
    options = [str(table), *_tiny(model), "--workers", "2"]

    reference = tmp_path / "uninterrupted"
    assert main(["cohort", *options, "--out", str(reference)]) == 0

    # The same run in another process, on the same cluster, killed once two rows are recorded.
    out = tmp_path / "out"
    address = ray_cluster.get_runtime_context().gcs_address
    command = [
        sys.executable,
        "-m",
        "medsam2.cli",
        "cohort",
        *options,
        "--out",
        str(out),
        "--ray-address",
        address,
    ]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while driver.poll() is None and time.monotonic() < deadline:
        if len(list((out / "records").glob("*.json"))) >= 2:
            driver.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    driver.wait(timeout=60)
    assert driver.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    finished = [json.loads(p.read_text()) for p in (out / "records").glob("*.json")]
    assert 2 <= len(finished) < 6 and all(r["status"] == "ok" for r in finished)
    capsys.readouterr()

    assert main(["cohort", *options, "--out", str(out)]) == 0
    assert f"6 rows: 6 ok ({len(finished)} finished earlier, skipped), 0 failed" in capsys.readouterr().out
    assert _comparable(out) == _comparable(reference)
    for row in _results(out):
        np.testing.assert_array_equal(
            io.read_labels(out / row["output"]).array, io.read_labels(reference / row["output"]).array
        )
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())

    # Once everything is finished, a run repeats nothing and leaves the table as it was, byte for byte.
    table_text = (out / "results.csv").read_bytes()
    assert main(["cohort", *options, "--out", str(out)]) == 0
    assert "6 rows: 6 ok (6 finished earlier, skipped), 0 failed" in capsys.readouterr().out
    assert (out / "results.csv").read_bytes() == table_text


def test_workers_that_do_not_fit_the_cluster_are_refused(ray_cluster, model, tmp_path):
    _sphere(tmp_path / "a.nrrd")
    table = read_table(_table(tmp_path, ['a.nrrd,ball,,"24,24",,12,,,1']))
    choice = ModelChoice(config=golden_config())
    with pytest.raises(InputError, match="3 workers of 1 CPU and 0 GPU each do not fit .* 2 CPUs and 0 GPUs"):
        run_cohort(table, tmp_path / "out", Settings(model=model), choice, Resources(workers=3))
    with pytest.raises(InputError, match="no room for a single worker"):
        run_cohort(table, tmp_path / "out", Settings(model=model), choice, Resources(gpus_per_worker=0.5))
