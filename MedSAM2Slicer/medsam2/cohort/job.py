"""A cohort run from start to end: check the rows, skip the finished ones, run the rest on Ray, keep the table.

The results table is rewritten (atomically) each time a group finishes, so it shows the run's progress and
survives a killed run; rows that have not run yet are ``pending`` in it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .driver import Reporter, Resources, Task, WorkerInfo, cluster, run_tasks
from .plan import ModelChoice, make_groups
from .rows import BadRow, RowSpec, Settings, check_rows
from .store import OutputStore, RowRecord, failed_record
from .table import Table


@dataclass(frozen=True)
class Outcome:
    """What a run did: ``records`` in table order; ``skipped`` rows were finished by an earlier run."""

    records: list[RowRecord]
    skipped: int
    results: Path

    @property
    def failed(self) -> list[RowRecord]:
        return [r for r in self.records if r.status == "failed"]


def run_cohort(
    table: Table,
    out: str | os.PathLike,
    defaults: Settings,
    choice: ModelChoice | None = None,
    resources: Resources | None = None,
    address: str | None = None,
    reporter: Reporter | None = None,
) -> Outcome:
    """Segment every row of ``table`` into the folder ``out``, on the Ray cluster at ``address`` (``None``:
    the Ray instance this process has started, or a new local one)."""
    store = OutputStore(out)
    choice, resources, reporter = choice or ModelChoice(), resources or Resources(), reporter or Reporter()
    checked = check_rows(table, defaults)
    groups = make_groups([r for r in checked if isinstance(r, RowSpec)], choice)
    book = _Book(store, checked, table.extra_columns)
    for bad in (r for r in checked if isinstance(r, BadRow)):
        book.add(failed_record(bad, None, bad.error))
    tasks, skipped = [], 0
    for group in groups:
        finished = [store.finished(r.id, h) for r, h in zip(group.rows, group.hashes)]
        for record in filter(None, finished):
            book.add(record)
        skipped += sum(1 for r in finished if r)
        if not all(finished):
            tasks.append(Task(group, frozenset(r.id for r in filter(None, finished))))
    ids = [r.id for r in checked]
    store.sweep_partial(ids)
    book.write()
    reporter.begin(sum(len(t.rows) for t in tasks), skipped)
    if tasks:
        with cluster(address) as ray:
            run_tasks(tasks, store, choice, resources, _Recording(book, reporter), ray)
        store.sweep_partial(ids)  # what a worker killed while writing left behind
    return Outcome(records=book.records(), skipped=skipped, results=book.write())


class _Book:
    """The records of the table's rows so far, saved and written to the results table as they come."""

    def __init__(
        self, store: OutputStore, rows: Sequence[RowSpec | BadRow], extra_columns: Sequence[str]
    ) -> None:
        self.store, self.rows, self.extra_columns = store, rows, extra_columns
        self.by_id: dict[str, RowRecord] = {}

    def add(self, record: RowRecord) -> None:
        self.store.save(record)
        self.by_id[record.id] = record

    def records(self) -> list[RowRecord]:
        return [self.by_id.get(r.id) or _pending(r) for r in self.rows]

    def write(self) -> Path:
        return self.store.write_results(self.records(), [r.extra for r in self.rows], self.extra_columns)


class _Recording(Reporter):
    """Keeps each finished row in the book before telling the run's reporter."""

    def __init__(self, book: _Book, reporter: Reporter) -> None:
        self.book, self.reporter = book, reporter

    def started(self, task: Task, worker: WorkerInfo | None) -> None:
        self.reporter.started(task, worker)

    def retrying(self, task: Task, error: str, attempt: int) -> None:
        self.reporter.retrying(task, error, attempt)

    def finished(self, records: Sequence[RowRecord]) -> None:
        for record in records:
            self.book.add(record)
        self.book.write()
        self.reporter.finished(records)


def _pending(row: RowSpec | BadRow) -> RowRecord:
    return RowRecord(id=row.id, structure=row.structure, image=row.image, status="pending")
