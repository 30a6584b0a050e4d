"""Ray as the engine of a cohort run: workers (Ray actors) on every device slot, one group of rows per task.

Each worker holds its models for the whole run and computes on the GPU Ray gives it (``num_gpus``, a fraction
when several workers share one) or on its CPU slots. The driver hands each idle worker the next group; when a
worker dies (killed, out of memory, its machine gone) its group goes back to the front of the queue for
another worker, up to ``retries`` times, and a new worker takes the dead one's place. A row whose own input is
bad fails inside the worker and is not retried.

Without an address a local Ray instance is started on the loopback interface only: this machine's workers,
unreachable from other machines. Ray chooses the interface when it is imported, so ``ray`` is imported here,
on first use, after asking for loopback. Every machine of a cluster needs ``medsam2[cohort]`` installed and
the table's files and the output folder at the same paths (a shared file system).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError, MedSAM2Error
from .plan import Group, ModelChoice
from .run import Models, device_name, run_group
from .store import OutputStore, RowRecord, failed_record

# Ray reads this when imported: off, a local instance binds to 127.0.0.1 instead of the machine's address.
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_NO_RAY = "medsam2 cohort runs on Ray, which is not installed: pip install 'medsam2[cohort]'"


@dataclass(frozen=True)
class Resources:
    """What each worker asks Ray for, and how many workers run.

    ``gpus_per_worker`` ``None`` means 1 when the cluster has GPUs and 0 otherwise; ``workers`` ``None``
    means as many as the cluster's GPUs (or CPUs) hold. ``retries``: how often a group is run again after
    its worker died.
    """

    workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None
    retries: int = 2


@dataclass(frozen=True)
class Task:
    """A group to run; ``skip`` names its rows finished earlier (segmented again with the others, not written)."""

    group: Group
    skip: frozenset[str] = frozenset()

    @property
    def rows(self) -> list[str]:
        return [i for i in self.group.ids if i not in self.skip]


@dataclass(frozen=True)
class WorkerInfo:
    pid: int
    host: str
    device: str


class Reporter:
    """What a run tells as it goes; these do nothing (the command line's progress bar is a subclass)."""

    def begin(self, rows: int, skipped: int) -> None:
        """``rows`` will run; ``skipped`` were finished earlier."""

    def started(self, task: Task, worker: WorkerInfo | None) -> None:
        """``task`` went to ``worker`` (``None`` if it died before it could say who it is)."""

    def retrying(self, task: Task, error: str, attempt: int) -> None:
        """The worker running ``task`` died on attempt ``attempt``; the task is queued again."""

    def finished(self, records: Sequence[RowRecord]) -> None:
        """These rows are done, as ``ok`` or ``failed``."""


def require_ray() -> None:
    """Raise a clear error, before any work, when Ray is not installed (without importing it)."""
    if importlib.util.find_spec("ray") is None:
        raise MedSAM2Error(_NO_RAY)


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MedSAM2Error(_NO_RAY) from None
    return ray


@contextmanager
def cluster(address: str | None) -> Iterator[Any]:
    """Ray, connected: the instance this process already started, the cluster at ``address``, or a new local
    one on loopback. Shuts down only what it connected."""
    if address is None and "ray" not in sys.modules:
        os.environ.setdefault(_LOOPBACK_ENV, "0")
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise MedSAM2Error(f"Could not connect to {where}: {error}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


class CohortWorker:
    """One worker: a process with its device, its loaded models and the output folder (a Ray actor)."""

    def __init__(self, choice: ModelChoice, folder: str, threads: int, gpu: bool) -> None:
        torch.set_num_threads(threads)
        self.device = "cuda" if gpu else "cpu"
        self.shown_device = device_name(self.device)
        self.models = Models(choice, self.device)
        self.store = OutputStore(folder)

    def describe(self) -> WorkerInfo:
        return WorkerInfo(pid=os.getpid(), host=socket.gethostname(), device=self.shown_device)

    def run(self, group: Group, skip: frozenset[str]) -> list[RowRecord]:
        return run_group(group, self.models, self.store, self.shown_device, skip)


@dataclass
class _Slot:
    """A started worker, and what it said about itself once it was up."""

    actor: Any
    describing: Any
    info: WorkerInfo | None = field(default=None)


def run_tasks(
    tasks: Sequence[Task],
    store: OutputStore,
    choice: ModelChoice,
    resources: Resources,
    reporter: Reporter,
    ray: Any,
) -> list[RowRecord]:
    """Run ``tasks`` on the connected Ray cluster; returns a record for every row they write."""
    lost = _worker_lost_errors(ray)
    start = _starter(ray, store, choice, resources)
    idle = [start() for _ in range(min(_worker_count(ray, resources), len(tasks)))]
    queue = deque((task, 1) for task in tasks)
    running: dict[Any, tuple[_Slot, Task, int]] = {}
    records: list[RowRecord] = []
    while queue or running:
        while idle and queue:
            slot, (task, attempt) = idle.pop(0), queue.popleft()
            running[slot.actor.run.remote(task.group, task.skip)] = (slot, task, attempt)
            reporter.started(task, _info(ray, slot, lost))
        done, _ = ray.wait(list(running), num_returns=1)
        slot, task, attempt = running.pop(done[0])
        try:
            result = ray.get(done[0])
            idle.append(slot)
        except lost as error:
            idle.append(start())  # the dead worker's replacement
            message = _first_line(error)
            if attempt <= resources.retries:
                reporter.retrying(task, message, attempt)
                queue.appendleft((task, attempt + 1))
                continue
            result = _failed(task, f"its worker died {attempt} times while running it (last: {message})")
        except ray.exceptions.RayError as error:  # an error outside any row's own work
            idle.append(slot)
            result = _failed(task, _first_line(error))
        for record in result:
            record.attempts = attempt
        records.extend(result)
        reporter.finished(result)
    for slot in idle:
        ray.kill(slot.actor)
    return records


def _starter(ray: Any, store: OutputStore, choice: ModelChoice, resources: Resources) -> Callable[[], _Slot]:
    gpus = _gpus_per_worker(ray, resources)
    remote = ray.remote(CohortWorker).options(num_cpus=resources.cpus_per_worker, num_gpus=gpus)
    threads = max(1, int(resources.cpus_per_worker))

    def start() -> _Slot:
        actor = remote.remote(choice, str(store.folder), threads, gpus > 0)
        return _Slot(actor=actor, describing=actor.describe.remote())

    return start


def _gpus_per_worker(ray: Any, resources: Resources) -> float:
    if resources.gpus_per_worker is not None:
        return resources.gpus_per_worker
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _worker_count(ray: Any, resources: Resources) -> int:
    """``resources.workers``, or as many as the cluster holds; refuses more than it holds."""
    total = ray.cluster_resources()
    gpus = _gpus_per_worker(ray, resources)
    fits = int(total.get("CPU", 0) // resources.cpus_per_worker) if resources.cpus_per_worker > 0 else None
    if gpus > 0:
        by_gpu = int(total.get("GPU", 0) // gpus)
        fits = by_gpu if fits is None else min(fits, by_gpu)
    count = resources.workers if resources.workers is not None else fits
    if fits is not None and count > fits:
        raise InputError(
            f"{count} workers of {resources.cpus_per_worker:g} CPU and {gpus:g} GPU each do not fit the Ray "
            f"cluster's {total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs"
        )
    if not count:
        raise InputError("The Ray cluster has no room for a single worker: ask for fewer CPUs or GPUs each")
    return count


def _info(ray: Any, slot: _Slot, lost: tuple[type, ...]) -> WorkerInfo | None:
    if slot.info is None:
        try:
            slot.info = ray.get(slot.describing)
        except lost:  # died while starting; its task will say so
            return None
    return slot.info


def _worker_lost_errors(ray: Any) -> tuple[type, ...]:
    """The errors that mean the worker is gone, not that the row is bad: these are retried."""
    errors = ray.exceptions
    return (
        errors.RayActorError,
        errors.WorkerCrashedError,
        errors.OutOfMemoryError,
        errors.NodeDiedError,
        errors.ObjectLostError,
    )


def _failed(task: Task, error: str) -> list[RowRecord]:
    group = task.group
    return [failed_record(r, h, error) for r, h in zip(group.rows, group.hashes) if r.id not in task.skip]


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
