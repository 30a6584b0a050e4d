"""Jobs of the engine service: a queue per device, one worker thread per device, status, cancel.

One job runs on a device at a time (a GPU does not get faster with two jobs sharing it, and its memory holds
one); jobs for other devices run alongside. A job is a function of a :class:`JobContext`, through which it
reports progress and sees its cancel event; it returns the JSON-able result. Finished jobs are kept (the most
recent ``keep_finished``) so that their clients can collect the result.
"""

from __future__ import annotations

import secrets
import threading
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from ..errors import Cancelled, MedSAM2Error


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class QueueFull(MedSAM2Error):
    """The server already holds as many waiting jobs as it was allowed."""


@dataclass
class JobContext:
    """What a running job sees: its cancel event and a progress callback (``done``, ``total``, ``message``)."""

    cancel: threading.Event
    progress: Callable[[int, int, str], None]
    # Extra status fields computed at poll time (e.g. a model download's progress), set by the job.
    detail: Callable[[], dict] | None = None


@dataclass
class Job:
    """One request's run. ``work(context)`` returns the result that ``status`` includes once done."""

    device: str
    work: Callable[[JobContext], dict]
    summary: str = ""
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    state: JobState = JobState.QUEUED
    done: int = 0
    total: int = 0
    message: str = "waiting for the device"
    error: dict | None = None
    result: dict | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    context: JobContext | None = None

    def status(self, position: int | None = None) -> dict:
        status = {
            "id": self.id,
            "state": self.state.value,
            "device": self.device,
            "done": self.done,
            "total": self.total,
            "message": self.message,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
        }
        if position is not None:
            status["queue_position"] = position
        if self.state is JobState.RUNNING and self.context is not None and self.context.detail is not None:
            status.update(self.context.detail())
        if self.error is not None:
            status["error"] = self.error
        if self.result is not None:
            status["result"] = self.result
        return status


class JobQueue:
    """Queues jobs per device and runs each device's jobs one at a time on a daemon thread of its own."""

    def __init__(self, max_queued: int, keep_finished: int = 64) -> None:
        self.max_queued = max_queued
        self.keep_finished = keep_finished
        self._lock = threading.Condition()
        self._waiting: dict[str, deque[Job]] = {}
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._workers: dict[str, threading.Thread] = {}
        self._counts = {state: 0 for state in JobState if state.finished}

    def submit(self, job: Job) -> Job:
        with self._lock:
            queued = sum(len(q) for q in self._waiting.values())
            if queued >= self.max_queued:
                raise QueueFull(
                    f"The server already has {queued} jobs waiting (its limit is {self.max_queued}); "
                    "try again when one has finished"
                )
            self._jobs[job.id] = job
            self._waiting.setdefault(job.device, deque()).append(job)
            if job.device not in self._workers:
                worker = threading.Thread(
                    target=self._serve, args=(job.device,), name=f"medsam2 {job.device}", daemon=True
                )
                self._workers[job.device] = worker
                worker.start()
            self._lock.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def status(self, job: Job) -> dict:
        with self._lock:
            waiting = self._waiting.get(job.device, ())
            position = next((i for i, j in enumerate(waiting) if j is job), None)
            return job.status(position)

    def cancel(self, job: Job) -> None:
        """A waiting job is cancelled at once; a running one stops within a frame."""
        with self._lock:
            job.cancel_event.set()
            waiting = self._waiting.get(job.device)
            if job.state is JobState.QUEUED and waiting is not None and job in waiting:
                waiting.remove(job)
                self._finish(job, JobState.CANCELLED, "cancelled before it started")

    def stats(self) -> dict:
        with self._lock:
            return {
                "queued": {device: len(q) for device, q in self._waiting.items() if q},
                "running": {j.device: j.id for j in self._jobs.values() if j.state is JobState.RUNNING},
                "finished": {state.value: n for state, n in self._counts.items()},
                "max_queued": self.max_queued,
            }

    def _serve(self, device: str) -> None:
        while True:
            with self._lock:
                while not self._waiting[device]:
                    self._lock.wait()
                job = self._waiting[device].popleft()
                job.state, job.started, job.message = JobState.RUNNING, time.time(), "starting"
            self._run(job)

    def _run(self, job: Job) -> None:
        def progress(done: int, total: int, message: str) -> None:
            job.done, job.total, job.message = int(done), int(total), str(message)

        job.context = JobContext(job.cancel_event, progress)
        try:
            if job.cancel_event.is_set():
                raise Cancelled("cancelled before it started")
            result = job.work(job.context)
        except Cancelled:
            with self._lock:
                self._finish(job, JobState.CANCELLED, "cancelled")
        except MedSAM2Error as error:  # the engine's own, clear message
            with self._lock:
                job.error = {"type": type(error).__name__, "message": str(error)}
                self._finish(job, JobState.FAILED, "failed")
        except Exception as error:  # a bug or a resource problem: keep the server up, report it
            traceback.print_exc()
            with self._lock:
                job.error = {"type": type(error).__name__, "message": f"{type(error).__name__}: {error}"}
                self._finish(job, JobState.FAILED, "failed")
        else:
            with self._lock:
                job.result = result
                self._finish(job, JobState.DONE, "done")
        finally:
            job.context = None

    def _finish(self, job: Job, state: JobState, message: str) -> None:
        job.state, job.message, job.finished = state, message, time.time()
        job.work = None  # drop the request's arrays
        self._counts[state] += 1
        finished = [j for j in self._jobs.values() if j.state.finished]
        for old in finished[: max(len(finished) - self.keep_finished, 0)]:
            del self._jobs[old.id]
