"""A table row checked and resolved into what a worker needs: its files, its prompt as typed, its settings.

Everything that can be checked without reading the image is checked here, in the driver, before any worker
starts; a row that fails a check becomes a :class:`BadRow` with the reason, and the other rows go on. What
needs the image (a prompt inside it, a readable file) is checked by the worker that reads it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import models
from ..cli_inputs import AXES, parse_window
from ..errors import InputError, MedSAM2Error
from .table import Table, TableRow

MEMORY_POLICIES = ("self-sorting", "recent")
ORIENTATIONS = (1, 2, 6)
_IMAGE_SUFFIXES = (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".mha", ".mhd")
_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


@dataclass(frozen=True)
class Settings:
    """How a row is segmented: the command's defaults, overridden by the row's own columns. Rows of one image
    with equal settings are segmented together."""

    model: str
    window: str | tuple[float, float] | None = None
    orientations: int = 6
    memory: str = "self-sorting"
    modality: str = "auto"
    seed: int = 0


@dataclass(frozen=True)
class PromptSpec:
    """A row's prompt as the table gives it (the text of its cells); see ``prompt.engine_prompts``."""

    points: tuple[str, ...] = ()
    box: str | None = None
    mask: str | None = None
    mask_label: int | None = None
    recist: str | None = None
    slice_index: int | None = None
    axis: str = "axial"
    world: bool = False


@dataclass(frozen=True)
class RowSpec:
    """A checked row: ``image``, ``reference`` and the mask are absolute paths."""

    id: str
    number: int
    structure: str
    image: str
    prompt: PromptSpec
    settings: Settings
    reference: str | None = None
    reference_label: int | None = None
    extra: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class BadRow:
    """A row that failed its checks: ``error`` says why."""

    id: str
    number: int
    structure: str | None
    image: str | None
    error: str
    extra: dict[str, str | None] = field(default_factory=dict)


def check_rows(table: Table, defaults: Settings) -> list[RowSpec | BadRow]:
    """Every row of ``table`` as a ``RowSpec``, or a ``BadRow`` with the reason it cannot run.

    Relative paths start at the table's folder. Raises ``InputError`` when two rows would write the same output
    (give them an ``id`` column).
    """
    folder = table.path.resolve().parent
    checked: list[RowSpec | BadRow] = []
    for row in table.rows:
        row_id = _row_id(row)
        try:
            checked.append(_check(row, row_id, folder, defaults))
        except MedSAM2Error as error:
            image = row.get("image")
            checked.append(
                BadRow(
                    id=row_id,
                    number=row.number,
                    structure=row.get("structure"),
                    image=str(folder / image) if image else None,
                    error=str(error),
                    extra=row.extra,
                )
            )
    _refuse_repeated_ids(checked)
    return checked


def _check(row: TableRow, row_id: str, folder: Path, defaults: Settings) -> RowSpec:
    image, structure = row.get("image"), row.get("structure")
    if image is None:
        raise InputError("The row has no image")
    if structure is None:
        raise InputError("The row has no structure name")
    return RowSpec(
        id=row_id,
        number=row.number,
        structure=structure,
        image=str(folder / image),
        prompt=_prompt(row, folder),
        settings=_settings(row, folder, defaults),
        reference=str(folder / row.get("reference")) if row.get("reference") else None,
        reference_label=_integer(row, "reference_label"),
        extra=row.extra,
    )


def _prompt(row: TableRow, folder: Path) -> PromptSpec:
    recist, mask = row.get("recist"), row.get("mask")
    points = tuple(p.strip() for p in (row.get("point") or "").split(";") if p.strip())
    if recist is not None and (points or row.get("box") or mask):
        raise InputError("Give either a recist line or a box, points or a mask: a row has one prompt")
    if recist is None and mask is None and not points and row.get("box") is None:
        raise InputError("The row has no prompt: fill box, point, mask or recist")
    axis = row.get("axis") or "axial"
    if axis not in AXES:
        raise InputError(f"axis {axis!r} is not one of {', '.join(AXES)}")
    return PromptSpec(
        points=points,
        box=row.get("box"),
        mask=str(folder / mask) if mask else None,
        mask_label=_integer(row, "mask_label"),
        recist=recist,
        slice_index=_integer(row, "slice"),
        axis=axis,
        world=_boolean(row, "world"),
    )


def _settings(row: TableRow, folder: Path, defaults: Settings) -> Settings:
    settings = defaults
    model = row.get("model")
    if model is not None:
        path = folder / model
        if path.is_file():
            settings = replace(settings, model=str(path))
        elif models.is_registered(model):
            settings = replace(settings, model=model)
        else:
            raise InputError(
                f"model {model!r} is neither a file (next to the table) nor a registered model "
                f"({', '.join(models.names())})"
            )
    window = row.get("window")
    if window is not None:
        settings = replace(settings, window=parse_window(window))
    orientations = _integer(row, "orientations")
    if orientations is not None:
        if orientations not in ORIENTATIONS:
            raise InputError(f"orientations must be 1, 2 or 6, got {orientations}")
        settings = replace(settings, orientations=orientations)
    memory = row.get("memory")
    if memory is not None:
        if memory not in MEMORY_POLICIES:
            raise InputError(f"memory must be {' or '.join(MEMORY_POLICIES)}, got {memory!r}")
        settings = replace(settings, memory=memory)
    return settings


def _integer(row: TableRow, column: str) -> int | None:
    text = row.get(column)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise InputError(f"{column} must be a whole number, got {text!r}") from None


def _boolean(row: TableRow, column: str) -> bool:
    text = (row.get(column) or "false").lower()
    if text not in _TRUE + _FALSE:
        raise InputError(f"{column} must be true or false, got {row.get(column)!r}")
    return text in _TRUE


def _row_id(row: TableRow) -> str:
    """The row's output name: its ``id`` cell, or the image's name and the structure's, made file-safe."""
    given = row.get("id")
    if given is None:
        image, structure = row.get("image"), row.get("structure")
        if image is None or structure is None:
            return f"row{row.number}"
        given = f"{_image_name(image)}_{structure}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", given).strip("._") or f"row{row.number}"


def _image_name(image: str) -> str:
    name = Path(image.rstrip("/\\")).name
    for suffix in _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _refuse_repeated_ids(rows: Sequence[RowSpec | BadRow]) -> None:
    seen: dict[str, int] = {}
    for row in rows:
        if row.id in seen:
            raise InputError(
                f"Rows {seen[row.id]} and {row.number} would both write {row.id!r}: give the table an id "
                "column with a distinct name for each row"
            )
        seen[row.id] = row.number
