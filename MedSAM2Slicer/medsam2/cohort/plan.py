"""Rows grouped by image, and the parameter hash that tells whether a row's output is still valid.

Rows of one image with the same settings are segmented in one ``segment_volume`` call, one object per row, so
the image is read once and each slice is encoded once for all its structures. The objects of one call share
more than the encoder: the early stop waits for all of them, and the extra axes visit the range that their
first-pass extents span together. A row's result therefore depends on the other rows of its group, and its
hash covers them: the engine's version, the model (a checkpoint file by its content, a registered model by
name and published digest), the configuration, the image (by path), the settings, and every row of the group
(structure, prompt, reference) in table order. Input files are identified by path, not by content.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import __version__, models
from ..configs import ModelConfig
from .rows import RowSpec, Settings


@dataclass(frozen=True)
class ModelChoice:
    """How every checkpoint file of the run is built: ``config`` a preset name or a ``ModelConfig`` (``None``:
    detected from the file), ``image_size`` the model's input size (``None``: the model's own)."""

    config: ModelConfig | str | None = None
    image_size: int | None = None


@dataclass(frozen=True)
class Group:
    """Rows segmented together: one image, one set of settings; ``hashes[i]`` is ``rows[i]``'s parameter hash."""

    image: str
    settings: Settings
    rows: tuple[RowSpec, ...]
    hashes: tuple[str, ...]

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.rows]


def make_groups(rows: Sequence[RowSpec], choice: ModelChoice) -> list[Group]:
    """The rows grouped by image and settings, in the order each group first appears in the table."""
    members: dict[tuple, list[RowSpec]] = {}
    for row in rows:
        members.setdefault((row.image, row.settings), []).append(row)
    identities: dict[str, dict] = {}
    groups = []
    for (image, settings), group_rows in members.items():
        if settings.model not in identities:
            identities[settings.model] = model_identity(settings.model)
        common = {
            "engine": __version__,
            "model": identities[settings.model],
            "config": _config_data(choice.config),
            "image_size": choice.image_size,
            "image": image,
            "settings": {**dataclasses.asdict(settings), "model": None},
            "rows": [_row_data(r) for r in group_rows],
        }
        digest = _digest(common)
        hashes = tuple(_digest({"group": digest, "row": i}) for i in range(len(group_rows)))
        groups.append(Group(image=image, settings=settings, rows=tuple(group_rows), hashes=hashes))
    return groups


def model_identity(source: str) -> dict:
    """What identifies a model's weights: a file's sha256, or a registered name with its published digest."""
    path = Path(source)
    if path.is_file():
        return {"sha256": models.hash_file(path)}
    entry = models.get(source)
    return {"name": entry.name, "sha256": entry.sha256}


def _row_data(row: RowSpec) -> dict:
    return {
        "structure": row.structure,
        "prompt": dataclasses.asdict(row.prompt),
        "reference": row.reference,
        "reference_label": row.reference_label,
    }


def _config_data(config: ModelConfig | str | None) -> object:
    return dataclasses.asdict(config) if isinstance(config, ModelConfig) else config


def _digest(data: object) -> str:
    text = json.dumps(data, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
