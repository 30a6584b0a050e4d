"""A Python client of the engine service (standard library HTTP, numpy arrays in and out).

    client = EngineClient("http://gpu-box:8765", token)
    result = client.segment_volume(volume, [Prompt(axis=0, index=40, box=(120, 80, 210, 190))],
                                   model="MedSAM2_latest", spacing=(2.5, 0.8, 0.8), window="abdomen")
    result.labels  # as medsam2.segment_volume gives them

Long runs: ``job = client.submit_volume(...)``, then ``job.poll()`` (one request, never blocks long) until
``job.poll().finished``, then ``job.result()``; ``job.cancel()`` asks the server to stop it. A volume is
uploaded once: the client asks whether the server has its digest first.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import Cancelled, CheckpointError, InputError, MedSAM2Error
from ..prompts import Prompt
from .wire import array_digest, compress_array, decode_array, encode_array, encode_prompt

ProgressCallback = Callable[[int, int, str], None]
_ENGINE_ERRORS = {"InputError": InputError, "CheckpointError": CheckpointError}


class ServerError(MedSAM2Error):
    """The server answered a request with an error status."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(f"{message} (HTTP {status})")
        self.status, self.kind, self.message = status, kind, message


class ServerUnavailable(MedSAM2Error):
    """The server could not be reached, or the connection broke (it may have stopped or crashed)."""


@dataclass
class JobStatus:
    """A job's state as the server last reported it."""

    id: str
    state: str
    done: int = 0
    total: int = 0
    message: str = ""
    queue_position: int | None = None
    download: dict | None = None
    error: dict | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    @property
    def running(self) -> bool:
        return self.state == "running"

    @classmethod
    def from_json(cls, status: dict) -> JobStatus:
        names = {f.name for f in dataclasses.fields(cls)} - {"raw"}
        return cls(**{k: v for k, v in status.items() if k in names}, raw=status)


class RemoteJob:
    """A job submitted to a server; ``decode`` turns its result JSON into the engine's result type."""

    def __init__(self, client: EngineClient, status: dict, decode: Callable[[dict], object]) -> None:
        self.client = client
        self.id = status["id"]
        self.status = JobStatus.from_json(status)
        self._decode = decode
        self._cancelled = False

    def poll(self) -> JobStatus:
        """Ask the server once for the job's state (no-op once it has finished)."""
        if not self.status.finished:
            self.status = JobStatus.from_json(self.client.request("GET", f"/v1/jobs/{self.id}"))
        return self.status

    def cancel(self) -> None:
        """Ask the server to stop the job (it stops within one frame); returns without waiting for it."""
        self._cancelled = True
        if not self.status.finished:
            self.status = JobStatus.from_json(self.client.request("POST", f"/v1/jobs/{self.id}/cancel"))

    def result(self):
        """The result of a finished job; raises the engine's error of a failed one, ``Cancelled`` if cancelled."""
        status = self.status
        if status.state == "done":
            return self._decode(status.raw["result"])
        if status.state == "cancelled" or self._cancelled:
            raise Cancelled("The job was cancelled on the server; nothing was returned")
        if status.state == "failed":
            error = status.error or {}
            kind = _ENGINE_ERRORS.get(error.get("type"), MedSAM2Error)
            raise kind(error.get("message", "the job failed on the server"))
        raise RuntimeError(f"Job {self.id} has not finished (it is {status.state})")

    def wait(
        self,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        poll_interval: float = 0.1,
    ):
        """Poll until the job ends (scripts and the CLI; a GUI polls from its timer instead)."""
        return wait_for(self, progress, cancel, poll_interval)


def wait_for(
    job,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    poll_interval: float = 0.1,
):
    """Poll ``job`` until it ends and return its ``result()``. ``job`` has ``poll()`` (returning a status with
    ``finished``, ``running``, ``done``, ``total`` and ``message``), ``cancel()`` and ``result()``. Progress is
    reported when it changes; setting ``cancel`` cancels the job, whose ``result()`` then raises ``Cancelled``."""
    reported = None
    while not (status := job.poll()).finished:
        if cancel is not None and cancel.is_set():
            job.cancel()
            break
        now = (status.done, status.total, status.message)
        if progress is not None and status.running and now != reported:
            progress(*now)
            reported = now
        time.sleep(poll_interval)
    return job.result()


class EngineClient:
    """Talks to one engine server at ``url`` with ``token``."""

    def __init__(self, url: str, token: str, timeout: float = 30.0) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise InputError(f"The server URL must look like http://host:port, got {url!r}")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._checkpoint_digests: dict[tuple[str, int, int], str] = {}
        self._max_request_bytes: int | None = None

    # -- requests -------------------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        query: dict | None = None,
        json_body: dict | None = None,
        timeout: float | None = None,
    ) -> dict | None:
        """One request; returns the JSON answer (None for HEAD). Error answers raise :class:`ServerError`."""
        url = self.url + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        headers = {"Authorization": f"Bearer {self.token}"}
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        elif body is not None:
            headers["Content-Type"] = "application/octet-stream"
        request = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                data = response.read()
        except urllib.error.HTTPError as error:
            raise _server_error(error) from None
        except (TimeoutError, urllib.error.URLError, http.client.HTTPException, ConnectionError) as error:
            reason = getattr(error, "reason", error)
            raise ServerUnavailable(f"The engine server at {self.url} does not answer: {reason}") from None
        return json.loads(data) if data and method != "HEAD" else None

    def exists(self, path: str) -> bool:
        try:
            self.request("HEAD", path)
        except ServerError as error:
            if error.status == 404:
                return False
            raise
        return True

    def health(self) -> dict:
        return self.request("GET", "/v1/health")

    def info(self) -> dict:
        """The server's version, devices (with GPU names), models, loaded models, jobs and caches."""
        return self.request("GET", "/v1/info")

    # -- uploads --------------------------------------------------------------------------------------------

    def upload_array(self, array: np.ndarray, force: bool = False) -> str:
        """Make sure the server has ``array``; returns its digest (uploads only when the server lacks it)."""
        array = np.ascontiguousarray(array)
        digest = array_digest(array)
        if force or not self.exists(f"/v1/arrays/{digest}"):
            query = {"dtype": array.dtype.name, "shape": ",".join(map(str, array.shape))}
            body = compress_array(array)
            self._check_size(len(body), f"The {array.shape} array")
            self.request("PUT", f"/v1/arrays/{digest}", body=body, query=query, timeout=600)
        return digest

    def _check_size(self, size: int, what: str) -> None:
        """Refuse a body the server would refuse, before sending it (a server that answers 413 early closes
        the connection while the body is still being sent, and the client would only see a broken pipe)."""
        if self._max_request_bytes is None:
            self._max_request_bytes = self.info()["limits"]["max_request_bytes"]
        if size > self._max_request_bytes:
            raise InputError(
                f"{what} takes {size / 2**20:.1f} MiB on the wire; the server at {self.url} accepts requests of "
                f"up to {self._max_request_bytes / 2**20:.0f} MiB (medsam2 serve --max-request-mb)"
            )

    def upload_checkpoint(self, path: str | os.PathLike) -> str:
        """Make sure the server has the checkpoint file at ``path``; returns its SHA-256 (remembered for this
        client while the file's size and time stay the same; nothing is written next to the file)."""
        path = Path(path)
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        digest = self._checkpoint_digests.get(key)
        if digest is None:
            from ..models import hash_file

            digest = self._checkpoint_digests[key] = hash_file(path)
        if not self.exists(f"/v1/checkpoints/{digest}"):
            self._check_size(stat.st_size, f"The checkpoint {path.name}")
            query = {"suffix": path.suffix.lower()}
            self.request(
                "PUT", f"/v1/checkpoints/{digest}", body=path.read_bytes(), query=query, timeout=3600
            )
        return digest

    # -- jobs -----------------------------------------------------------------------------------------------

    def submit_volume(
        self,
        volume: np.ndarray,
        prompts: Sequence[Prompt],
        model: str = "medsam2-lite",
        spacing: Sequence[float] | None = None,
        device: str = "auto",
        dtype: str | None = None,
        return_probabilities: bool = False,
        **options,
    ) -> RemoteJob:
        """Start ``medsam2.segment_volume`` on the server. ``model`` is a registry name or a local checkpoint
        file (uploaded once); ``options`` are ``segment_volume``'s keyword options."""
        request = {
            **self._model_fields(model, device, dtype, options),
            "volume": self.upload_array(volume),
            "prompts": [encode_prompt(p) for p in prompts],
            "spacing": None if spacing is None else [float(s) for s in spacing],
            "options": _json_options(options),
            "return_probabilities": return_probabilities,
        }
        return self._submit("/v1/jobs/volume", request, [volume], decode_volume_result)

    def segment_volume(
        self,
        volume: np.ndarray,
        prompts: Sequence[Prompt],
        model: str = "medsam2-lite",
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        **options,
    ):
        """``medsam2.segment_volume`` run on the server; returns a ``VolumeResult``."""
        return self.submit_volume(volume, prompts, model, **options).wait(progress, cancel)

    def submit_images(
        self,
        images: Sequence[np.ndarray],
        template: int = 0,
        points: Sequence[Sequence[float]] | None = None,
        labels: Sequence[int] | None = None,
        box: Sequence[float] | None = None,
        mask: np.ndarray | None = None,
        model: str = "medsam2-lite",
        device: str = "auto",
        dtype: str | None = None,
        memory=None,
        seed: int = 0,
        config=None,
        image_size: int | None = None,
    ) -> RemoteJob:
        """Start ``medsam2.segment_images`` on the server."""
        options = {"memory": memory} if memory is not None else {}
        model_options = {"config": config, "image_size": image_size}
        request = {
            **self._model_fields(model, device, dtype, model_options),
            "seed": int(seed),
            "images": [self.upload_array(np.asarray(image)) for image in images],
            "template": int(template),
            "points": None if points is None else np.asarray(points, dtype=float).tolist(),
            "labels": None if labels is None else [int(v) for v in labels],
            "box": None if box is None else np.asarray(box, dtype=float).tolist(),
            "mask": None if mask is None else encode_array(np.asarray(mask, dtype=bool)),
            **_json_options(options),
        }
        return self._submit("/v1/jobs/images", request, list(images), decode_images_result)

    def segment_images(self, images: Sequence[np.ndarray], template: int = 0, **prompt) -> list[np.ndarray]:
        """``medsam2.segment_images`` run on the server; returns one boolean mask per image."""
        progress, cancel = prompt.pop("progress", None), prompt.pop("cancel", None)
        return self.submit_images(images, template, **prompt).wait(progress, cancel)

    def _model_fields(self, model: str, device: str, dtype: str | None, options: dict) -> dict:
        fields_ = {"device": device, "dtype": dtype}
        for name in ("config", "image_size"):
            if name in options:
                value = options.pop(name)
                fields_[name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        if Path(str(model)).suffix.lower() in (".pt", ".pth", ".safetensors") and Path(model).is_file():
            return {**fields_, "checkpoint": self.upload_checkpoint(model)}
        return {**fields_, "model": str(model)}

    def _submit(self, path: str, request: dict, arrays: list[np.ndarray], decode: Callable) -> RemoteJob:
        try:
            status = self.request("POST", path, json_body=request)
        except ServerError as error:
            if error.status != 404 or "upload it first" not in error.message:
                raise
            # The server dropped an upload since we asked (its store is full, or it restarted): once more.
            for array in arrays:
                self.upload_array(np.asarray(array), force=True)
            status = self.request("POST", path, json_body=request)
        return RemoteJob(self, status, decode)


def decode_volume_result(result: dict):
    from ..volume import VolumeResult

    max_bytes = 1 << 40  # the server made these; their sizes are known to be sane
    return VolumeResult(
        labels=decode_array(result["labels"], max_bytes),
        probabilities={
            int(k): decode_array(v, max_bytes) for k, v in (result.get("probabilities") or {}).items()
        },
        frames_visited=result.get("frames_visited", {}),
        frames_encoded=result.get("frames_encoded", 0),
        timings=result.get("timings", {}),
        window=None if result.get("window") is None else tuple(result["window"]),
    )


def decode_images_result(result: dict) -> list[np.ndarray]:
    return [decode_array(mask, 1 << 40) for mask in result["masks"]]


def _json_options(options: dict) -> dict:
    """``segment_volume`` options as JSON: ``MemoryOptions`` as its fields, tuples as lists."""
    encoded = {}
    for name, value in options.items():
        if dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        elif isinstance(value, tuple):
            value = [float(v) for v in value]
        elif isinstance(value, np.generic):
            value = value.item()
        encoded[name] = value
    return encoded


def _server_error(error: urllib.error.HTTPError) -> ServerError:
    try:
        details = json.loads(error.read() or b"{}").get("error", {})
    except (ValueError, AttributeError):
        details = {}
    return ServerError(
        error.code, details.get("type", "HTTPError"), details.get("message", str(error.reason))
    )
