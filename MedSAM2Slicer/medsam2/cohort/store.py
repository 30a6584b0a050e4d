"""The output folder of a cohort run: one segmentation and one record per row, and the results table.

```
OUT/ID.seg.nrrd        the row's segmentation on its image's grid (one segment, named after the structure)
OUT/records/ID.json    the row's result, with its parameter hash
OUT/results.csv        one line per row of the table, in table order
```

Every file is written to a temporary name beside it and renamed into place, so a run killed at any moment
leaves whole files or none. A row's record is written after its segmentation: a record of an ``ok`` row whose
hash matches and whose segmentation exists means the row is finished, and a re-run skips it. Only the driver
writes records and the table; a worker writes the segmentations of the rows it ran.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io as text_io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..commands import write_text
from ..errors import InputError
from .rows import BadRow, RowSpec

RESULTS_NAME = "results.csv"
COLUMNS = (
    "id",
    "structure",
    "image",
    "status",
    "output",
    "volume_ml",
    "dice",
    "hd95",
    "seconds",
    "device",
    "attempts",
    "error",
    "prompt",
    "params_hash",
)


@dataclass
class RowRecord:
    """The result of one row. ``status`` is ``ok`` or ``failed`` (``error`` says why); ``output`` is the
    segmentation's file name in the output folder; ``seconds`` the row's share of its group's time; ``hd95``
    in mm (``None`` where one mask is empty); ``prompt`` the engine prompts the row became."""

    id: str
    structure: str | None
    image: str | None
    status: str
    params_hash: str | None = None
    output: str | None = None
    volume_ml: float | None = None
    dice: float | None = None
    hd95: float | None = None
    seconds: float | None = None
    device: str | None = None
    attempts: int = 1
    error: str | None = None
    prompt: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def failed_record(row: RowSpec | BadRow, params_hash: str | None, error: str) -> RowRecord:
    """The record of a row that failed with ``error``."""
    return RowRecord(
        id=row.id,
        structure=row.structure,
        image=row.image,
        status="failed",
        params_hash=params_hash,
        error=" ".join(error.split()),
    )


class OutputStore:
    """The output folder (created if missing; its parent must exist)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder).resolve()
        if self.folder.exists() and not self.folder.is_dir():
            raise InputError(f"--out {self.folder} exists and is not a folder")
        if not self.folder.parent.is_dir():
            raise InputError(f"Cannot create {self.folder}: the folder {self.folder.parent} does not exist")
        self.records = self.folder / "records"
        self.records.mkdir(parents=True, exist_ok=True)

    def segmentation(self, row_id: str) -> Path:
        return self.folder / f"{row_id}.seg.nrrd"

    def finished(self, row_id: str, params_hash: str) -> RowRecord | None:
        """The row's record if it finished with these parameters and its segmentation is there."""
        record = self.load(row_id)
        if record is None or not record.ok or record.params_hash != params_hash:
            return None
        return record if self.segmentation(row_id).is_file() else None

    def load(self, row_id: str) -> RowRecord | None:
        try:
            fields = json.loads((self.records / f"{row_id}.json").read_text())
            return RowRecord(**fields)
        except (OSError, ValueError, TypeError):  # none yet, or not one of ours: the row runs again
            return None

    def save(self, record: RowRecord) -> None:
        write_text(
            self.records / f"{record.id}.json", json.dumps(dataclasses.asdict(record), indent=1) + "\n"
        )

    def write_results(
        self,
        records: Sequence[RowRecord],
        extra: Sequence[dict[str, str | None]],
        extra_columns: Sequence[str],
    ) -> Path:
        """``results.csv``: the records in table order, each followed by its row's carried columns."""
        buffer = text_io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([*COLUMNS, *extra_columns])
        for record, cells in zip(records, extra):
            writer.writerow([_cell(record, c) for c in COLUMNS] + [cells.get(c) or "" for c in extra_columns])
        path = self.folder / RESULTS_NAME
        write_text(path, buffer.getvalue())
        return path

    def sweep_partial(self, row_ids: Sequence[str]) -> int:
        """Remove what a killed run left of its atomic writes (``.NAME.*`` beside ``NAME``); returns how many."""
        names = [f"{i}.seg.nrrd" for i in row_ids] + [RESULTS_NAME]
        leftovers = [p for name in names for p in self.folder.glob(f".{_glob_escape(name)}.*")]
        leftovers += [p for i in row_ids for p in self.records.glob(f".{_glob_escape(i)}.json.*")]
        for path in leftovers:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return len(leftovers)


def _cell(record: RowRecord, column: str) -> str:
    value = getattr(record, column)
    if value is None:
        return ""
    if column == "prompt":
        return json.dumps(value, separators=(",", ":")) if value else ""
    if isinstance(value, float):
        return f"{value:.4f}" if column in ("dice", "hd95", "volume_ml") else f"{value:.2f}"
    return str(value)


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)
