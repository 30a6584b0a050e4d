"""One persistent background thread that runs long jobs so the GUI stays live (plain Python, no Qt).

The GUI submits a job, then polls it from a timer: ``job.progress_updates()`` returns the progress reports
made since the last poll, ``job.done`` says when it finished and ``job.result()`` gives its value or raises
its exception. ``job.cancel()`` sets the event the job watches.

Usage::

    worker = Worker()
    job = worker.submit(logic.run, request)         # called as logic.run(request, progress=..., cancel=...)
    ...                                             # GUI timer: job.progress_updates(), job.done
    segment_id = logic.apply(request, job.result())
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from medsam2.errors import Cancelled


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    message: str


class Job:
    """A function queued on a :class:`Worker`; thread-safe to poll, cancel and wait on from any thread."""

    def __init__(self, function: Callable, args: tuple, kwargs: dict) -> None:
        self._call = (function, args, kwargs)
        self.cancel_event = threading.Event()
        self._updates: queue.SimpleQueue[Progress] = queue.SimpleQueue()
        self._finished = threading.Event()
        self._value = None
        self._error: BaseException | None = None

    def report(self, done: int, total: int, message: str = "") -> None:
        """Progress callback handed to the job's function (called on the worker thread)."""
        self._updates.put(Progress(int(done), int(total), str(message)))

    def progress_updates(self) -> list[Progress]:
        """The progress reports made since the previous call, oldest first."""
        updates = []
        while True:
            try:
                updates.append(self._updates.get_nowait())
            except queue.Empty:
                return updates

    def cancel(self) -> None:
        """Ask the job to stop; a job that has not started yet will not run and raises ``Cancelled``."""
        self.cancel_event.set()

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)

    def result(self, timeout: float | None = None):
        """The function's return value; re-raises its exception. ``TimeoutError`` if not done in time."""
        if not self._finished.wait(timeout):
            raise TimeoutError("The job is still running")
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self._finished.wait(timeout):
            raise TimeoutError("The job is still running")
        return self._error

    def _run(self) -> None:
        function, args, kwargs = self._call
        try:
            if self.cancel_event.is_set():
                raise Cancelled("The job was cancelled before it started")
            self._value = function(*args, progress=self.report, cancel=self.cancel_event, **kwargs)
        except BaseException as error:  # handed to the caller, whatever it is
            self._error = error
        finally:
            self._call = None
            self._finished.set()


class Worker:
    """Runs submitted jobs one after another on a single daemon thread, started on first use."""

    def __init__(self, name: str = "MedSAM2 worker") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._jobs: queue.SimpleQueue[Job | None] | None = None

    def submit(self, function: Callable, *args, **kwargs) -> Job:
        """Queue ``function(*args, progress=..., cancel=..., **kwargs)``; returns its :class:`Job`."""
        job = Job(function, args, kwargs)
        with self._lock:
            if self._thread is None:
                # Each thread has its own queue, so a shutdown's stop marker reaches only that thread.
                self._jobs = queue.SimpleQueue()
                self._thread = threading.Thread(
                    target=_serve, args=(self._jobs,), name=self.name, daemon=True
                )
                self._thread.start()
            self._jobs.put(job)
        return job

    def shutdown(self, timeout: float | None = None) -> None:
        """Let queued jobs finish, then stop the thread (a later ``submit`` starts a new one)."""
        with self._lock:
            thread, jobs = self._thread, self._jobs
            self._thread = self._jobs = None
        if thread is not None:
            jobs.put(None)
            thread.join(timeout)


def _serve(jobs: queue.SimpleQueue) -> None:
    while (job := jobs.get()) is not None:
        job._run()
