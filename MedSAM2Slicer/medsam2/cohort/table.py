"""Reading a cohort table: a CSV or Parquet file with one row per structure to segment.

Every cell comes back as text (``None`` where empty), whatever the file's column types, so that the rows of a
CSV file and of the same table saved as Parquet are the same. Columns the cohort does not know are carried
through to the results table (a patient id, say), unless the name looks like a misspelt known column.
"""

from __future__ import annotations

import csv
import difflib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

# The columns a row may fill, and what each holds.
COLUMNS = {
    "image": "volume file or DICOM folder (relative paths start at the table's folder)",
    "structure": "name of the structure: the segment name, and part of the output file name",
    "id": "output name of the row (default: IMAGE-NAME_STRUCTURE)",
    "reference": "reference label map on the image's grid: adds Dice and HD95",
    "reference_label": "label value of the structure in the reference (default: any non-zero voxel)",
    "box": "X0,Y0,X1,Y1 voxel column/row on SLICE (with world: x,y,z,x,y,z in mm)",
    "point": "X,Y[,L] voxel column/row on SLICE (with world: x,y,z[,L] mm); several separated by ';'",
    "mask": "mask prompt: a label volume on the image's grid or a 2D mask of SLICE",
    "mask_label": "label value of the mask prompt (default: any non-zero voxel)",
    "recist": "RECIST line X0,Y0,X1,Y1 on SLICE (with world: x,y,z,x,y,z mm), turned into a box",
    "slice": "index of the prompted slice along AXIS",
    "axis": "axial (default), coronal or sagittal",
    "world": "true: box, point and recist are physical x,y,z in mm (LPS)",
    "model": "registered model name or checkpoint file for this row (default: --model)",
    "window": "CT window for this row: a preset name or LEVEL,WIDTH (default: --window)",
    "orientations": "1, 2 or 6 for this row (default: --orientations)",
    "memory": "self-sorting or recent for this row (default: --memory)",
}
REQUIRED = ("image", "structure")
PROMPT_COLUMNS = ("box", "point", "mask", "recist")
SUFFIXES = (".csv", ".parquet")


@dataclass(frozen=True)
class TableRow:
    """One data row: ``number`` counts from 1 (the first row under the header); ``cells`` holds the known
    columns (``None`` where empty) and ``extra`` the other columns, carried into the results."""

    number: int
    cells: dict[str, str | None]
    extra: dict[str, str | None] = field(default_factory=dict)

    def get(self, column: str) -> str | None:
        return self.cells.get(column)


@dataclass(frozen=True)
class Table:
    """The rows of a table file, and the names of its carried (unknown) columns in file order."""

    path: Path
    rows: list[TableRow]
    extra_columns: tuple[str, ...]


def read_table(path: str | os.PathLike) -> Table:
    """Read a ``.csv`` (UTF-8, a header line) or ``.parquet`` cohort table; checks its columns."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"The table {path} does not exist (expected a .csv or .parquet file)")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        header, records = _read_csv(path)
    elif suffix == ".parquet":
        header, records = _read_parquet(path)
    else:
        raise InputError(f"The table {path.name} must be a .csv or .parquet file")
    extra = _check_columns(header, path)
    if not records:
        raise InputError(f"The table {path} has a header but no rows")
    for number, record in enumerate(records, start=1):
        if None in record:  # csv puts the cells past the header's last column under the key None
            raise InputError(f"Row {number} of the table {path} has more cells than the header has columns")
    rows = [
        TableRow(
            number=n,
            cells={c: _text(r.get(c)) for c in COLUMNS if c in header},
            extra={c: _text(r.get(c)) for c in extra},
        )
        for n, r in enumerate(records, start=1)
    ]
    return Table(path=path, rows=rows, extra_columns=extra)


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [(name or "").strip() for name in reader.fieldnames or []]
            reader.fieldnames = header
            records = list(reader)
    except UnicodeDecodeError as error:
        raise InputError(f"The table {path} is not UTF-8 text: {error}") from None
    except csv.Error as error:
        raise InputError(f"The table {path} is not valid CSV: {error}") from None
    if not header:
        raise InputError(f"The table {path} is empty: it needs a header line naming its columns")
    return header, records


def _read_parquet(path: Path) -> tuple[list[str], list[dict]]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise InputError(
            "Reading a Parquet table needs pyarrow: pip install 'medsam2[cohort]' (or give a .csv table)"
        ) from None
    try:
        table = parquet.read_table(path)
    except Exception as error:  # pyarrow raises its own error types for a damaged file
        raise InputError(f"The table {path} is not a readable Parquet file: {error}") from None
    return [name.strip() for name in table.column_names], table.to_pylist()


def _check_columns(header: Sequence[str], path: Path) -> tuple[str, ...]:
    twins = sorted({c for c in header if header.count(c) > 1})
    if twins:
        raise InputError(f"The table {path} names the column {twins[0]!r} twice")
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise InputError(f"The table {path} has no {' or '.join(repr(c) for c in missing)} column")
    if not any(c in header for c in PROMPT_COLUMNS):
        raise InputError(f"The table {path} has no prompt column: give one of {', '.join(PROMPT_COLUMNS)}")
    extra = tuple(c for c in header if c not in COLUMNS)
    for name in extra:
        close = difflib.get_close_matches(name.lower(), list(COLUMNS), n=1, cutoff=0.8)
        if close:
            raise InputError(
                f"The table {path} has a column {name!r}: did you mean {close[0]!r}? (Columns the cohort does "
                "not know are carried to the results; rename it if that is what you want.)"
            )
    return extra


def _text(value: object) -> str | None:
    """A cell as text: ``None`` for empty or missing, integral floats without ``.0`` (Parquet stores an
    integer column with gaps as floats), booleans as ``true``/``false``."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return str(int(value))
    text = str(value).strip()
    return text or None
