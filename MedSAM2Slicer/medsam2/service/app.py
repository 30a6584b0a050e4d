"""The engine service's HTTP layer (FastAPI): routes, token check, body limits, errors as JSON.

Every route needs ``Authorization: Bearer <token>``. Errors are ``{"error": {"type", "message"}}`` with a 4xx
status for anything the request got wrong (400 bad field, 401 token, 404 unknown array/model/job, 413 too
large, 422 malformed JSON or a missing field, 429 queue full) and 500 only for a fault of the server. The
routes are documented in the README ("The engine service") and at ``/docs`` on a running server.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict

from .. import __version__
from ..errors import InputError, MedSAM2Error
from .engine import ServiceEngine
from .jobs import QueueFull
from .store import CHECKPOINT_SUFFIXES, NotFound, checked_digest
from .wire import decompress_array

API = "/v1"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelChoice(_Strict):
    """The model a job runs: a registered ``model`` name or an uploaded ``checkpoint`` (SHA-256)."""

    model: str | None = None
    checkpoint: str | None = None
    config: str | dict[str, Any] | None = None
    image_size: int | None = None
    device: str = "auto"
    dtype: str | None = None


class VolumeJob(ModelChoice):
    task: str = "segment_volume"
    volume: str
    prompts: list[dict[str, Any]]
    spacing: list[float] | None = None
    options: dict[str, Any] = {}
    return_probabilities: bool = False


class ImagesJob(ModelChoice):
    task: str = "segment_images"
    images: list[str]
    template: int = 0
    points: list[list[float]] | None = None
    labels: list[int] | None = None
    box: list[float] | None = None
    mask: dict[str, Any] | None = None
    memory: dict[str, Any] | None = None
    seed: int = 0


class _BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware in front of every route: the bearer token (compared in constant time) and the size
    of the request body (by its Content-Length, and counted as it arrives)."""

    def __init__(self, app, token: str, max_body_bytes: int) -> None:
        self.app = app
        self._token_hash = hashlib.sha256(f"Bearer {token}".encode()).digest()
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given = hashlib.sha256(headers.get(b"authorization", b"")).digest()
        if not hmac.compare_digest(given, self._token_hash):
            await _send_error(
                send, 401, "Unauthorized", "A valid 'Authorization: Bearer <token>' is required"
            )
            return
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await _send_error(
                send, 413, "TooLarge", f"Request bodies are limited to {self.max_body_bytes} bytes"
            )
            return
        received, started = 0, False

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise _BodyTooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                limit = self.max_body_bytes
                await _send_error(send, 413, "TooLarge", f"Request bodies are limited to {limit} bytes")


async def _send_error(send, status: int, kind: str, message: str) -> None:
    body = json.dumps({"error": {"type": kind, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status)


def create_app(engine: ServiceEngine, token: str) -> FastAPI:
    """The ASGI application serving ``engine`` to clients that present ``token``."""
    if not token:
        raise ValueError("The engine service needs a token")
    app = FastAPI(title="MedSAM2 engine service", version=__version__)

    @app.exception_handler(NotFound)
    async def not_found(request: Request, error: NotFound) -> JSONResponse:
        return _error(404, "NotFound", str(error))

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, error: QueueFull) -> JSONResponse:
        return _error(429, "QueueFull", str(error))

    @app.exception_handler(InputError)
    async def input_error(request: Request, error: InputError) -> JSONResponse:
        return _error(400, "InputError", str(error))

    @app.exception_handler(MedSAM2Error)
    async def engine_error(request: Request, error: MedSAM2Error) -> JSONResponse:
        return _error(400, type(error).__name__, str(error))

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
            for e in error.errors()
        )
        return _error(422, "MalformedRequest", problems)

    @app.get(f"{API}/health")
    def health() -> dict:
        return {"status": "ok", "version": __version__}

    @app.get(f"{API}/info")
    def info() -> dict:
        return engine.info()

    @app.head(f"{API}/arrays/{{digest}}")
    def has_array(digest: str) -> Response:
        return Response(status_code=200 if checked_digest(digest) in engine.arrays else 404)

    @app.put(f"{API}/arrays/{{digest}}", status_code=201)
    async def put_array(digest: str, dtype: str, shape: str, request: Request) -> dict:
        """The body is the array's C-order bytes, zlib-compressed; ``shape`` is comma-separated."""
        checked_digest(digest)
        body = await request.body()
        sizes = shape.split(",")
        array = await run_in_threadpool(decompress_array, body, dtype, sizes, engine.limits.max_array_bytes)
        added = await run_in_threadpool(engine.arrays.add, digest, array)
        return {"digest": digest, "stored": added}

    @app.head(f"{API}/checkpoints/{{digest}}")
    def has_checkpoint(digest: str) -> Response:
        return Response(status_code=200 if engine.checkpoints.find(digest) is not None else 404)

    @app.put(f"{API}/checkpoints/{{digest}}", status_code=201)
    async def put_checkpoint(digest: str, suffix: str, request: Request) -> dict:
        """The body is the checkpoint file as it is; ``suffix`` is one of .pt, .pth, .safetensors."""
        checked_digest(digest)
        if suffix not in CHECKPOINT_SUFFIXES:
            raise InputError(f"suffix must be one of {', '.join(CHECKPOINT_SUFFIXES)}, got {suffix!r}")
        body = await request.body()
        added = await run_in_threadpool(engine.checkpoints.add, digest, suffix, [body])
        return {"digest": digest, "stored": added}

    @app.post(f"{API}/jobs/volume", status_code=202)
    def post_volume_job(job: VolumeJob) -> dict:
        return engine.queue.status(engine.submit_volume(job.model_dump()))

    @app.post(f"{API}/jobs/images", status_code=202)
    def post_images_job(job: ImagesJob) -> dict:
        return engine.queue.status(engine.submit_images(job.model_dump()))

    @app.get(f"{API}/jobs/{{job_id}}")
    def job_status(job_id: str) -> dict:
        return engine.queue.status(_job(engine, job_id))

    @app.post(f"{API}/jobs/{{job_id}}/cancel")
    def cancel_job(job_id: str) -> dict:
        job = _job(engine, job_id)
        engine.queue.cancel(job)
        return engine.queue.status(job)

    return Guard(app, token, engine.limits.max_request_bytes)


def _job(engine: ServiceEngine, job_id: str):
    job = engine.queue.get(job_id)
    if job is None:
        raise NotFound(f"No job {job_id!r} on this server (finished jobs are kept for a while only)")
    return job
