"""An engine server started as a child process on this computer (Slicer's local mode, tests, scripts).

The child is ``medsam2 serve`` run by ``python`` (default ``sys.executable``; the Slicer module passes
PythonSlicer, since inside Slicer ``sys.executable`` is the application) on a free loopback port, with a
random token passed through its environment, watching this process (``--parent-pid``) so that it exits when
we do, however we end. Its port arrives through a ready file; its output goes to a log file, so that no thread
of ours has to read a pipe.
Nothing here blocks for long: :meth:`LocalServer.poll` looks once, for a GUI timer; :meth:`wait_ready` loops
for scripts.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from enum import Enum
from pathlib import Path

from ..errors import MedSAM2Error
from .client import EngineClient
from .serve import TOKEN_ENV

# The folder holding the ``medsam2`` package. Inside Slicer the package sits in the module's folder, which only
# the Slicer process's own sys.path knows about, and PythonSlicer's launcher sets PYTHONPATH itself; so the
# child is told the folder on its command line and puts it first on its sys.path.
PACKAGE_PARENT = Path(__file__).resolve().parents[2]
_BOOTSTRAP = "import sys; sys.path.insert(0, sys.argv.pop(1)); from medsam2.cli import main; sys.exit(main())"


class ServerState(str, Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    CRASHED = "crashed"


class ServerStartError(MedSAM2Error):
    """The engine server process did not start, or ended."""


class LocalServer:
    """One engine server child process; :meth:`start` again after it stopped or crashed starts a new one."""

    def __init__(
        self,
        python: str | os.PathLike | None = None,
        folder: str | os.PathLike | None = None,
        extra_args: tuple[str, ...] = (),
        environment: dict[str, str] | None = None,
    ) -> None:
        self.python = str(python or sys.executable)
        self.folder = Path(folder) if folder is not None else Path(tempfile.gettempdir()) / "medsam2-server"
        self.extra_args = tuple(extra_args)
        self.environment = dict(environment or {})
        self.process: subprocess.Popen | None = None
        self.client: EngineClient | None = None
        self._ready_file: Path | None = None
        self._token = ""
        self.log_file: Path | None = None
        self.started_at: float | None = None

    @property
    def state(self) -> ServerState:
        if self.process is None:
            return ServerState.STOPPED
        if self.process.poll() is not None:
            return ServerState.CRASHED
        return ServerState.RUNNING if self.client is not None else ServerState.STARTING

    def start(self) -> None:
        """Start the child (returns at once; :meth:`poll` or :meth:`wait_ready` tell when it listens)."""
        if self.state in (ServerState.STARTING, ServerState.RUNNING):
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        tag = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._ready_file = self.folder / f"ready-{tag}.json"
        self.log_file = self.folder / f"server-{tag}.log"
        environment = {**os.environ, **self.environment, TOKEN_ENV: token, "PYTHONUNBUFFERED": "1"}
        command = [
            self.python,
            "-c",
            _BOOTSTRAP,
            str(PACKAGE_PARENT),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--ready-file",
            str(self._ready_file),
            "--parent-pid",
            str(os.getpid()),
            *self.extra_args,
        ]
        with open(self.log_file, "wb") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
            )
        self._token = token
        self.client = None
        self.started_at = time.monotonic()

    def poll(self) -> ServerState:
        """Look once whether the child is listening yet; raises :class:`ServerStartError` if it ended."""
        state = self.state
        if state is ServerState.CRASHED:
            raise ServerStartError(self.crash_report())
        if state is ServerState.STARTING and self._ready_file.is_file():
            ready = json.loads(self._ready_file.read_text())
            self._ready_file.unlink(missing_ok=True)
            self.client = EngineClient(ready["url"], self._token)
            state = ServerState.RUNNING
        return state

    def wait_ready(self, timeout: float = 120.0) -> EngineClient:
        """Start if needed and wait until the child listens; returns its client."""
        self.start()
        deadline = time.monotonic() + timeout
        while self.poll() is not ServerState.RUNNING:
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(
                    f"The engine server did not start within {timeout:.0f} s. {self._log_tail()}"
                )
            time.sleep(0.05)
        return self.client

    def wait_stopped(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the child to end; True if it has."""
        if self.process is None:
            return True
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """End the child: asked first, then killed."""
        process, self.process, self.client = self.process, None, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def crash_report(self, advice: str = "") -> str:
        """What happened to a server that ended, ``advice`` for the user, then the end of its log."""
        code = None if self.process is None else self.process.returncode
        lines = [
            f"The MedSAM2 engine server stopped unexpectedly (exit code {code}).",
            advice,
            self._log_tail(),
        ]
        return " ".join(line for line in lines if line)

    def _log_tail(self, lines: int = 8) -> str:
        if self.log_file is None or not self.log_file.is_file():
            return ""
        tail = self.log_file.read_text(errors="replace").strip().splitlines()[-lines:]
        return f"Its log ({self.log_file}) ends with:\n" + "\n".join(tail) if tail else ""
