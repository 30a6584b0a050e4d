"""The engine service with real processes on loopback: ``medsam2 serve`` started as a child process, spoken to
over HTTP by the Python client.

The model is the tiny random-weight SAM 2.1 of the golden files, uploaded as a checkpoint with its config;
results are compared with ``medsam2.segment_volume`` run in this process on the same weights.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import numpy as np
import pytest
from golden import GOLDEN, golden_config, golden_model

import medsam2
from medsam2 import Prompt
from medsam2.errors import Cancelled, CheckpointError, InputError
from medsam2.service.client import EngineClient, ServerError, ServerUnavailable
from medsam2.service.local import LocalServer, ServerState

WEIGHTS = GOLDEN / "sam2.1" / "weights.safetensors"
SHAPE = (10, 40, 48)


@pytest.fixture(scope="module")
def server():
    local = LocalServer(extra_args=("--max-queued", "16"))
    local.wait_ready()
    yield local
    local.stop()


@pytest.fixture(scope="module")
def client(server) -> EngineClient:
    return server.client


@pytest.fixture(scope="module")
def model() -> medsam2.SAM2Model:
    return golden_model()


def volume(shift: int = 0) -> np.ndarray:
    """A noisy blob whose position moves with ``shift``, so that each volume has its own answer."""
    z, y, x = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    blob = ((z - 5) ** 2 / 9 + (y - 18 - shift) ** 2 / 64 + (x - 20 - shift) ** 2 / 100) < 1
    noise = np.random.default_rng(shift).normal(0, 10, SHAPE)
    return (200 * blob + noise).astype(np.int16)


def prompt(shift: int = 0) -> list[Prompt]:
    return [Prompt(axis=0, index=5, box=(12 + shift, 11 + shift, 30 + shift, 26 + shift))]


def remote(client: EngineClient, shift: int = 0, **options):
    options = {"modality": "mr", "orientations": 6, **options}
    return client.segment_volume(
        volume(shift), prompt(shift), model=str(WEIGHTS), config=golden_config(), **options
    )


def local_run(model, shift: int = 0, **options):
    options = {"modality": "mr", "orientations": 6, **options}
    return medsam2.segment_volume(model, volume(shift), prompt(shift), **options)


def raw_request(client: EngineClient, method: str, path: str, body: bytes | None = None, headers=None):
    """A request outside the client, to send what the client never would; returns (status, JSON)."""
    request = urllib.request.Request(client.url + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def test_results_equal_the_in_process_engine_and_a_second_run_reuses_the_encoding(client, model):
    expected = local_run(model)
    frames_before = client.info()["frames_encoded"]
    first = remote(client)
    np.testing.assert_array_equal(first.labels, expected.labels)
    assert first.window == expected.window
    assert first.frames_encoded == expected.frames_encoded > 0
    assert client.info()["frames_encoded"] - frames_before == expected.frames_encoded

    # A correction on the same volume: a mask on another slice. Its slices were mostly encoded already.
    mask = np.zeros(SHAPE[1:], bool)
    mask[14:24, 16:26] = True
    corrected = [*prompt(), Prompt(axis=0, index=6, mask=mask)]
    in_process = medsam2.segment_volume(model, volume(), corrected, modality="mr")
    before = client.info()["frames_encoded"]
    job = client.submit_volume(
        volume(),
        corrected,
        model=str(WEIGHTS),
        config=golden_config(),
        modality="mr",
        return_probabilities=True,
    )
    again = job.wait()
    np.testing.assert_array_equal(again.labels, in_process.labels)
    np.testing.assert_array_equal(again.probabilities[1], in_process.probabilities[1])
    encoded = client.info()["frames_encoded"] - before
    assert encoded == again.frames_encoded < in_process.frames_encoded
    assert client.info()["feature_cache"]["cpu"]["hits"] > 0


def test_a_volume_is_uploaded_once(client):
    array = volume(3)
    digest = client.upload_array(array)
    status, _ = raw_request(
        client, "HEAD", f"/v1/arrays/{digest}", headers={"Authorization": f"Bearer {client.token}"}
    )
    assert status == 200
    assert client.upload_array(array) == digest  # found by its digest: not sent again
    assert client.info()["arrays"]["arrays"] >= 1


def test_eight_concurrent_clients_each_get_their_own_result(server, model):
    shifts = list(range(8))
    expected = {s: local_run(model, s, orientations=2).labels for s in shifts}
    results, errors = {}, []

    def one_client(shift: int) -> None:
        try:
            own = EngineClient(server.client.url, server.client.token)
            results[shift] = remote(own, shift, orientations=2).labels
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=one_client, args=(s,)) for s in shifts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors
    assert sorted(results) == shifts
    for shift in shifts:
        np.testing.assert_array_equal(results[shift], expected[shift])


def test_cancel_stops_a_running_job_and_a_queued_one(client):
    long_volume = np.repeat(volume(), 12, axis=0)  # 120 slices: long enough to cancel mid-run
    long_prompt = [Prompt(axis=0, index=60, box=(12, 11, 30, 26))]
    options = {"model": str(WEIGHTS), "config": golden_config(), "modality": "mr", "early_stop": False}
    running = client.submit_volume(long_volume, long_prompt, **options)
    queued = client.submit_volume(long_volume, long_prompt, **options)
    deadline = time.monotonic() + 60
    while running.poll().done < 2:
        assert time.monotonic() < deadline and not running.status.finished
        time.sleep(0.05)
    queued.cancel()
    assert queued.status.state == "cancelled"
    running.cancel()
    while not running.poll().finished:
        time.sleep(0.05)
    assert running.status.state == "cancelled"
    assert running.status.done < running.status.total
    with pytest.raises(Cancelled):
        running.result()


@pytest.mark.parametrize("token", [None, "wrong"])
def test_a_wrong_or_missing_token_gets_401(client, token):
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    for method, path in [("GET", "/v1/info"), ("GET", "/v1/jobs/x"), ("POST", "/v1/jobs/volume")]:
        status, body = raw_request(client, method, path, b"{}" if method == "POST" else None, headers)
        assert status == 401, path
        assert "Bearer" in body["error"]["message"]
    with pytest.raises(ServerError) as refused:
        EngineClient(client.url, "wrong").info()
    assert refused.value.status == 401


def test_bad_requests_get_clear_4xx_answers_and_the_server_stays_up(client):
    auth = {"Authorization": f"Bearer {client.token}", "Content-Type": "application/json"}
    status, body = raw_request(client, "POST", "/v1/jobs/volume", b"{not json", auth)
    assert status == 422 and body["error"]["type"] == "MalformedRequest"
    status, body = raw_request(client, "POST", "/v1/jobs/volume", b'{"prompts": []}', auth)
    assert status == 422 and "volume" in body["error"]["message"]

    digest = client.upload_array(volume())
    with pytest.raises(ServerError, match="Unknown model 'no-such-model'") as unknown:
        client.submit_volume(volume(), prompt(), model="no-such-model")
    assert unknown.value.status == 404
    outside = [Prompt(axis=0, index=25, box=(1, 1, 5, 5))]
    with pytest.raises(ServerError, match="slice 25 is outside the volume") as refused:
        client.submit_volume(volume(), outside, model="medsam2-lite")
    assert refused.value.status == 400
    with pytest.raises(ServerError, match="orientations must be one of") as bad_option:
        client.submit_volume(volume(), prompt(), model="medsam2-lite", orientations=3)
    assert bad_option.value.status == 400
    with pytest.raises(ServerError, match="No array") as missing:
        client.request("POST", "/v1/jobs/volume", json_body={"volume": "0" * 64, "prompts": [], "model": "x"})
    assert missing.value.status == 404
    status, body = raw_request(
        client, "PUT", f"/v1/arrays/{digest[::-1]}?dtype=int16&shape=2,2", b"not zlib", auth
    )
    assert status == 400 and "zlib" in body["error"]["message"]
    assert client.health()["status"] == "ok"


def test_limits_on_request_size_and_queue_length():
    small = LocalServer(extra_args=("--max-request-mb", "1", "--max-queued", "1"))
    try:
        client = small.wait_ready()
        connection = http.client.HTTPConnection(*client.url.removeprefix("http://").split(":"))
        connection.putrequest("PUT", f"/v1/arrays/{'0' * 64}?dtype=int16&shape=1048576")
        connection.putheader("Authorization", f"Bearer {client.token}")
        connection.putheader("Content-Length", str(2 << 20))
        connection.endheaders()  # the server answers from the headers alone
        answer = connection.getresponse()
        assert answer.status == 413
        assert "limited to 1048576 bytes" in json.loads(answer.read())["error"]["message"]
        connection.close()
        noise = np.random.default_rng(0).integers(0, 2**15, (16, 256, 256), dtype=np.int16)  # 2 MiB of noise
        with pytest.raises(InputError, match="accepts requests of up to 1 MiB"):
            client.upload_array(noise)
        long_volume = np.repeat(volume(), 12, axis=0)
        options = {"model": str(WEIGHTS), "config": golden_config(), "modality": "mr", "early_stop": False}
        long_prompt = [Prompt(axis=0, index=60, box=(12, 11, 30, 26))]
        first = client.submit_volume(long_volume, long_prompt, **options)
        while first.poll().state == "queued":
            time.sleep(0.05)
        second = client.submit_volume(long_volume, long_prompt, **options)  # waits: the queue is now full
        with pytest.raises(ServerError, match="limit is 1") as full:
            client.submit_volume(long_volume, long_prompt, **options)
        assert full.value.status == 429
        for job in (second, first):
            job.cancel()
        assert client.health()["status"] == "ok"
    finally:
        small.stop()


def test_a_killed_server_gives_a_clear_error_and_the_next_start_is_a_new_server():
    from MedSAM2SlicerLib.engines import EngineStopped, LocalEngine

    engine = LocalEngine()
    try:
        client = engine.server.wait_ready()
        first_pid = engine.server.process.pid
        long_volume = np.repeat(volume(), 12, axis=0)
        request = _request(long_volume, [Prompt(axis=0, index=60, box=(12, 11, 30, 26))])
        run = engine.submit(request, str(WEIGHTS))
        while run.poll().done < 1:
            assert not run.done, run.status
            time.sleep(0.05)
        os.kill(first_pid, signal.SIGKILL)
        engine.server.process.wait(10)
        while not run.poll().phase.finished:
            time.sleep(0.05)
        with pytest.raises(
            EngineStopped, match=r"stopped unexpectedly \(exit code -9\).*next run starts a new"
        ):
            run.result()
        with pytest.raises(ServerUnavailable):
            client.info()
        assert engine.server.state is ServerState.CRASHED

        again = engine.submit(_request(volume(), prompt()), str(WEIGHTS))
        result = again.wait()
        assert engine.server.process.pid != first_pid
        assert result.labels.shape == SHAPE
    finally:
        engine.shutdown()


def test_the_server_exits_when_its_parent_dies(tmp_path):
    """A parent that is killed (as a crashed Slicer would be) leaves no server behind."""
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path[:0] = {sys.path!r}
        from medsam2.service.local import LocalServer
        server = LocalServer(folder={str(tmp_path)!r})
        server.wait_ready()
        print(server.process.pid, flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        server_pid = int(parent.stdout.readline())
        assert _alive(server_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 15
        while _alive(server_pid):
            assert time.monotonic() < deadline, "the server outlived its parent"
            time.sleep(0.1)
    finally:
        parent.kill()


def test_what_only_the_run_finds_fails_the_job_with_the_engines_message(client):
    job = client.submit_volume(volume(), prompt(), model=str(WEIGHTS), config="sam2.1_hiera_t", modality="mr")
    with pytest.raises(CheckpointError, match="sam2.1_hiera_t"):
        job.wait()  # the tiny checkpoint does not fit the preset: found when the model is loaded
    assert job.status.state == "failed"
    assert client.health()["status"] == "ok"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has exited
        return stat.read().split(") ")[-1][0] != "Z"


def _request(array, prompts):
    """A ``logic.Request`` without a scene: what ``SegmentationLogic.prepare`` would copy out of one."""
    from types import SimpleNamespace

    geometry = SimpleNamespace(spacing=None, shape=array.shape)
    options = {"modality": "mr", "early_stop": False, "config": golden_config()}
    return SimpleNamespace(volume=array, prompts=prompts, geometry=geometry, threshold=None, options=options)


def test_the_cli_segments_through_a_server(client, model, tmp_path):
    """``medsam2 segment --server URL --token-file F``: the same labels as the command run in-process."""
    import SimpleITK as sitk

    from medsam2.cli import main

    image = sitk.GetImageFromArray(volume())
    image.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    token = tmp_path / "token"
    token.write_text(client.token + "\n")
    common = [
        "segment",
        str(tmp_path / "ct.nrrd"),
        "--slice",
        "5",
        "--box",
        "12,11,30,26",
        "--modality",
        "mr",
    ]
    common += ["--model", str(WEIGHTS), "--config", str(tmp_path / "config.json"), "--orientations", "2"]
    (tmp_path / "config.json").write_text(json.dumps(golden_config().__dict__))
    assert main([*common, "-o", str(tmp_path / "here.nrrd")]) == 0
    served = [
        *common,
        "-o",
        str(tmp_path / "served.nrrd"),
        "--server",
        client.url,
        "--token-file",
        str(token),
    ]
    assert main(served) == 0
    here = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "here.nrrd")))
    there = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "served.nrrd")))
    np.testing.assert_array_equal(there, here)
    token.write_text("wrong")
    refused = [
        *common,
        "-o",
        str(tmp_path / "refused.nrrd"),
        "--server",
        client.url,
        "--token-file",
        str(token),
    ]
    assert main(refused) == 2
    assert not (tmp_path / "refused.nrrd").exists()


def test_a_model_download_shows_in_the_job_status(monkeypatch, tmp_path):
    """While a registry model downloads, a running job's status carries the bytes so far (read from the
    download's partial file, so the downloader needs no callback)."""
    from medsam2 import models
    from medsam2.service.engine import download_status

    monkeypatch.setenv("MEDSAM2_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))
    entry = models.get("sam2.1_hiera_tiny")
    assert download_status(entry.name) == {
        "download": {"model": entry.name, "bytes": 0, "total": entry.size_bytes}
    }
    (tmp_path / (entry.filename + ".partial")).write_bytes(b"x" * 1000)
    assert download_status(entry.name)["download"]["bytes"] == 1000
    (tmp_path / entry.filename).write_bytes(b"done")
    assert download_status(entry.name) == {}
    assert download_status("medsam2-lite") == {}  # shipped and assembled locally: nothing to download


def test_the_model_pool_keeps_only_the_most_recently_used_models(tmp_path):
    """Switching models in a session must not keep every model loaded; a model evicted while a job holds it
    still runs that job."""
    from medsam2.service.store import CheckpointStore, ModelKey, ModelPool

    config = json.dumps(golden_config().__dict__, sort_keys=True)

    def key(dtype, image_size=None):
        return ModelKey(str(WEIGHTS), None, "cpu", dtype, config, image_size)

    pool = ModelPool(CheckpointStore(tmp_path, 1 << 20), capacity=2)
    first = pool.get(key(None))
    assert pool.get(key(None)) is first
    pool.get(key("float32"))
    pool.get(key(None))  # now the most recently used
    larger = key(None, 2 * golden_config().image_size)
    pool.get(larger)
    assert pool.loaded() == [key(None).label, larger.label]
    pool.get(key("float32"))
    assert pool.loaded() == [larger.label, key("float32").label]

    held = medsam2.segment_volume(first, volume(), prompt(), orientations=1)
    reloaded = pool.get(key(None))
    assert reloaded is not first
    again = medsam2.segment_volume(reloaded, volume(), prompt(), orientations=1)
    np.testing.assert_array_equal(held.probabilities[1], again.probabilities[1])
    with pytest.raises(ValueError, match="at least one"):
        ModelPool(CheckpointStore(tmp_path, 1 << 20), capacity=0)
