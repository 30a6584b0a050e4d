"""Where a segmentation runs: an engine server, on this computer or on another one.

Inside Slicer no engine work may run in the Slicer process: PythonQt keeps Python's GIL on the GUI thread, so
a Python worker thread there gets the lock only between GUI events and crawls (BENCHMARKS.md, "Engine
service"). The engine runs in a server process instead:

- :class:`LocalEngine`: a server that Slicer starts as its child with its own Python (PythonSlicer), on a free
  loopback port with a random token; it exits with Slicer, and a new one is started after a crash.
- :class:`RemoteEngine`: a server at a URL with a token, e.g. a GPU machine (``medsam2 serve --host 0.0.0.0``).

``engine.submit(request, model, device)`` returns a :class:`ServerRun` at once. The GUI calls its ``poll()``
from a timer: each call makes at most one short request, so the GUI never waits on the engine, and no thread
is needed. Scripts call ``run.wait()``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from medsam2.errors import Cancelled, InputError, MedSAM2Error
from medsam2.service.client import EngineClient, RemoteJob, ServerUnavailable, wait_for
from medsam2.service.local import LocalServer, ServerStartError, ServerState

ProgressCallback = Callable[[int, int, str], None]


class EngineStopped(MedSAM2Error):
    """The engine server stopped or could not be reached while a run was going on."""


class RunPhase(str, Enum):
    STARTING = "starting the engine"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (RunPhase.DONE, RunPhase.FAILED, RunPhase.CANCELLED)


@dataclass(frozen=True)
class RunStatus:
    """A run as last polled: its phase, frames ``done`` of ``total``, the engine's message, and the bytes of
    a model download under way (``download``: ``(done, total or None)``)."""

    phase: RunPhase
    done: int = 0
    total: int = 0
    message: str = ""
    download: tuple[int, int | None] | None = None

    @property
    def finished(self) -> bool:
        return self.phase.finished

    @property
    def running(self) -> bool:
        return self.phase is RunPhase.RUNNING


class ServerRun:
    """One segmentation on an engine server, from submission to result."""

    def __init__(
        self, engine: ServerEngine, request, model: str, device: str, image_size: int | None = None
    ) -> None:
        self.engine = engine
        self.request = request
        self.model, self.device, self.image_size = model, device, image_size
        self.status = RunStatus(RunPhase.STARTING, message=engine.starting_message())
        self.job: RemoteJob | None = None
        self._result = None
        self._error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.status.phase.finished

    def poll(self) -> RunStatus:
        """Advance by at most one request to the server; returns the status."""
        if self.done:
            return self.status
        try:
            if self.job is None:
                client = self.engine.ready_client()
                if client is None:
                    return self.status
                self.job = client.submit_volume(
                    self.request.volume,
                    self.request.prompts,
                    model=self.model,
                    spacing=self.request.geometry.spacing,
                    device=self.device,
                    image_size=self.image_size,
                    return_probabilities=self.request.threshold is not None,
                    **self.request.options,
                )
            job = self.job.poll()
        except (ServerUnavailable, ServerStartError) as error:
            return self._fail(EngineStopped(self.engine.failure_report(error)))
        except MedSAM2Error as error:  # the server refused the request: its message says why
            return self._fail(error)
        download = None if job.download is None else (job.download["bytes"], job.download.get("total"))
        self.status = RunStatus(RunPhase(job.state), job.done, job.total, job.message, download)
        if job.finished:
            try:
                self._result = self.job.result()
            except (Cancelled, MedSAM2Error) as error:
                self._error = error
        return self.status

    def cancel(self) -> None:
        """Stop the run now: the server is asked to stop the job (within a frame) and nothing more is awaited."""
        if self.done:
            return
        if self.job is not None:
            # The server may be gone or the job over: either way nothing more will come of it.
            with contextlib.suppress(MedSAM2Error):
                self.job.cancel()
        self._error = Cancelled("Cancelled: the segment is unchanged")
        self.status = RunStatus(RunPhase.CANCELLED, self.status.done, self.status.total, "cancelled")

    def result(self):
        """The engine's result; raises what stopped the run (``Cancelled``, the engine's error, ...)."""
        if not self.done:
            raise RuntimeError("The run has not finished")
        if self._error is not None:
            raise self._error
        return self._result

    def wait(
        self,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        poll_interval: float = 0.1,
    ):
        """Poll until the run ends, then return its result (scripts and tests; the GUI polls from a timer)."""
        return wait_for(self, progress, cancel, poll_interval)

    def _fail(self, error: BaseException) -> RunStatus:
        self._error = error
        self.status = RunStatus(RunPhase.FAILED, self.status.done, self.status.total, str(error))
        return self.status


class ServerEngine:
    """An engine server that runs segmentations; see :class:`LocalEngine` and :class:`RemoteEngine`."""

    def submit(self, request, model: str, device: str = "auto", image_size: int | None = None) -> ServerRun:
        """Start the run of ``request`` (a ``logic.Request``); returns at once."""
        if not isinstance(model, str):
            raise InputError(
                "An engine server loads models itself: give a registry name or a checkpoint file"
            )
        self.prepare()
        return ServerRun(self, request, str(model), device, image_size)

    def prepare(self) -> None:
        """Get ready for a run (e.g. start a stopped server); must not block."""

    def ready_client(self) -> EngineClient | None:
        """The client, or None while the server is still starting."""
        raise NotImplementedError

    def connect(self) -> EngineClient:
        """The client once the server answers (a stopped local server is started and waited for)."""
        raise NotImplementedError

    def starting_message(self) -> str:
        return "connecting to the engine"

    def failure_report(self, error: BaseException) -> str:
        return str(error)

    def describe(self) -> str:
        raise NotImplementedError


class LocalEngine(ServerEngine):
    """A server on this computer, started as a child process on first use and again after a crash."""

    def __init__(self, server: LocalServer | None = None) -> None:
        self.server = server or LocalServer()

    def prepare(self) -> None:
        if self.server.state in (ServerState.STOPPED, ServerState.CRASHED):
            self.server.start()

    def ready_client(self) -> EngineClient | None:
        return self.server.client if self.server.poll() is ServerState.RUNNING else None

    def connect(self) -> EngineClient:
        return self.server.wait_ready()

    def starting_message(self) -> str:
        return (
            "starting the engine" if self.server.state is ServerState.STARTING else "connecting to the engine"
        )

    def failure_report(self, error: BaseException) -> str:
        # A connection cut by the server's death can arrive before the process has been reaped.
        self.server.wait_stopped(timeout=1.0)
        if self.server.state is ServerState.CRASHED:
            return self.server.crash_report("The next run starts a new engine.")
        return str(error)

    def describe(self) -> str:
        state = self.server.state
        if state is ServerState.RUNNING and self.server.client is not None:
            return f"running on this computer ({self.server.client.url}, process {self.server.process.pid})"
        return {
            ServerState.STOPPED: "not started (starts with the first run)",
            ServerState.STARTING: "starting...",
            ServerState.CRASHED: "stopped unexpectedly (restarts with the next run)",
        }.get(state, state.value)

    def shutdown(self) -> None:
        self.server.stop()


class RemoteEngine(ServerEngine):
    """A server at ``url`` that this computer does not manage."""

    def __init__(self, url: str, token: str, timeout: float = 30.0) -> None:
        if not token:
            raise InputError("A remote engine server needs its token")
        self.client = EngineClient(url, token, timeout=timeout)

    def ready_client(self) -> EngineClient:
        return self.client

    def connect(self) -> EngineClient:
        return self.client

    def failure_report(self, error: BaseException) -> str:
        return f"{error}. Check that the server runs and that this computer can reach it."

    def describe(self) -> str:
        return f"server at {self.client.url}"


def connection_summary(engine: ServerEngine) -> str:
    """One line on the engine: where it runs, its version, its GPUs and its models."""
    client = engine.connect()
    info = client.info()
    gpus = [d["description"] for d in info["devices"] if d["name"].startswith("cuda")]
    devices = ", ".join(gpus) if gpus else "no GPU (CPU only)"
    cached = sum(1 for m in info["models"] if m["cached"])
    return (
        f"MedSAM2 engine {info['version']} at {client.url} (PyTorch {info['torch']}): {devices}; "
        f"{len(info['models'])} models, {cached} ready without download"
    )
