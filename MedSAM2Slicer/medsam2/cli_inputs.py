"""Turning command-line text into engine inputs: coordinates, windows, model choices and prompts.

Every bad value raises :class:`~medsam2.errors.InputError` (or ``MedSAM2Error``) with a one-line message, so
the command line can print it and exit with status 2 before any output is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import io, models
from .configs import PRESETS, ModelConfig
from .errors import InputError
from .load import load_model, resolve_device
from .model.build import build_model
from .model.sam2 import SAM2Model
from .preprocess import WINDOW_PRESETS
from .prompts import Prompt

AXES = {"axial": 0, "coronal": 1, "sagittal": 2}
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def parse_numbers(text: str, counts: Sequence[int], what: str) -> list[float]:
    """``"1,2.5,3"`` -> ``[1.0, 2.5, 3.0]``; the number of values must be one of ``counts``."""
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if len(values) not in counts or not all(np.isfinite(values)):
        expected = " or ".join(str(c) for c in counts)
        raise InputError(f"{what} needs {expected} comma-separated numbers, got {text!r}")
    return values


def parse_window(text: str | None) -> str | tuple[float, float] | None:
    """A preset name (``lung``, ...) or ``level,width`` in HU."""
    if text is None or text in WINDOW_PRESETS:
        return text
    if "," not in text:
        raise InputError(f"Unknown window {text!r}: use one of {', '.join(WINDOW_PRESETS)} or LEVEL,WIDTH")
    level, width = parse_numbers(text, (2,), "--window")
    if width <= 0:
        raise InputError(f"--window width must be positive, got {width:g}")
    return level, width


def model_config(text: str | None) -> ModelConfig | str | None:
    """``--config``: a preset name, or a JSON file of ``ModelConfig`` fields (lists become tuples)."""
    if text is None or text in PRESETS:
        return text
    path = Path(text)
    if not path.is_file():
        raise InputError(f"--config {text!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file")
    try:
        fields = json.loads(path.read_text())
        if isinstance(fields, dict) and isinstance(fields.get("config"), dict):
            fields = fields["config"]  # a file that records the config next to other facts
        return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    except (OSError, ValueError, TypeError) as error:
        raise InputError(f"--config {path} is not a JSON object of ModelConfig fields: {error}") from None


def open_model(
    source: str, config: ModelConfig | str | None, image_size: int | None, device: str
) -> SAM2Model:
    """``load_model`` with a clear message for a name that is neither a file nor a registered model."""
    path = Path(source).expanduser()
    if not path.exists():
        models.get(source)  # raises, listing the registered names, when ``source`` is not one of them
    return load_model(path if path.exists() else source, config=config, image_size=image_size, device=device)


def random_model(config: ModelConfig | str, image_size: int | None, device: str, seed: int = 0) -> SAM2Model:
    """A model with random weights (for timing without any checkpoint)."""
    if isinstance(config, str):
        config = ModelConfig.preset(config, image_size)
    elif image_size is not None:
        config = config.with_image_size(image_size)
    torch.manual_seed(seed)
    return build_model(config).to(resolve_device(device)).eval()


@dataclass
class PromptArgs:
    """The prompt as typed: ``points`` hold 2-3 numbers each (``x,y[,label]``), or 3-4 with ``world``."""

    points: list[str] = field(default_factory=list)
    box: str | None = None
    mask: str | None = None
    mask_label: int | None = None
    slice_index: int | None = None
    axis: str = "axial"
    world: bool = False
    obj_id: int = 1
    absent: list[int] = field(default_factory=list)


def volume_prompts(args: PromptArgs, image: io.Image) -> list[Prompt]:
    """The engine prompts for ``image`` (one per prompted slice), checked to lie inside the volume."""
    axis = AXES[args.axis]
    if args.mask is not None:
        if args.points or args.box:
            raise InputError("Give either --mask or --point/--box: a prompt is a mask or clicks and a box")
        if args.world:
            raise InputError("--world applies to --point and --box; a --mask lies on the image grid already")
        index, mask = mask_prompt(args.mask, image, axis, args.slice_index, args.mask_label)
        prompts = [Prompt(axis=axis, index=index, obj_id=args.obj_id, mask=mask)]
    elif not args.points and args.box is None:
        raise InputError("Give a prompt: --box, --point (repeatable) or --mask")
    elif args.world:
        if args.slice_index is not None:
            raise InputError("--slice does not go with --world: world coordinates already give the slice")
        prompts = _world_prompts(args, image, axis)
    else:
        if args.slice_index is None:
            raise InputError(
                f"Give --slice K: the {args.axis} slice that the voxel coordinates of --point/--box lie on "
                "(or use --world with coordinates in mm)"
            )
        points = [parse_numbers(p, (2, 3), "--point") for p in args.points]
        box = parse_numbers(args.box, (4,), "--box") if args.box is not None else None
        prompts = [_prompt(axis, args.slice_index, args.obj_id, points, box)]
    prompts += [Prompt(axis=axis, index=k, obj_id=args.obj_id, absent=True) for k in args.absent]
    for p in prompts:
        p.check_fits(image.array.shape)
    return prompts


def _prompt(axis: int, index: int, obj_id: int, points: list[list[float]], box: list[float] | None) -> Prompt:
    labels = [_point_label(p[2]) if len(p) == 3 else 1 for p in points]
    return Prompt(
        axis=axis,
        index=index,
        obj_id=obj_id,
        points=[p[:2] for p in points] or None,
        labels=labels or None,
        box=box,
    )


def _point_label(value: float) -> int:
    if value not in (0.0, 1.0):
        raise InputError(f"A point's label is 1 (include) or 0 (exclude), got {value:g}")
    return int(value)


def world_to_index(image: io.Image, xyz: Sequence[float]) -> np.ndarray:
    """Physical ``(x, y, z)`` mm (LPS, SimpleITK) -> continuous voxel index ``(i, j, k)`` of ``image``."""
    to_physical = np.asarray(image.direction) @ np.diag(image.spacing)
    return np.linalg.solve(to_physical, np.asarray(xyz, dtype=np.float64) - np.asarray(image.origin))


def _world_prompts(args: PromptArgs, image: io.Image, axis: int) -> list[Prompt]:
    """Points and box in mm, grouped into one prompt per slice they fall on."""
    by_slice: dict[int, tuple[list[list[float]], list[float] | None]] = {}
    for text in args.points:
        values = parse_numbers(text, (3, 4), "--point with --world")
        index, (x, y) = _on_slice(image, axis, values[:3], f"point {text}")
        by_slice.setdefault(index, ([], None))[0].append([x, y, *values[3:]])
    if args.box is not None:
        values = parse_numbers(args.box, (6,), "--box with --world (two corners x,y,z)")
        corners = [world_to_index(image, values[:3]), world_to_index(image, values[3:])]
        for corner, name in zip(corners, ("first", "second")):
            _check_inside(image, corner, f"the {name} corner of box {args.box}")
        index, (xa, ya), (xb, yb) = _box_on_slice(image, axis, corners)
        points = by_slice.get(index, ([], None))[0]
        by_slice[index] = (points, [min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)])
    return [
        _prompt(axis, index, args.obj_id, points, box) for index, (points, box) in sorted(by_slice.items())
    ]


def _on_slice(image: io.Image, axis: int, xyz: Sequence[float], what: str) -> tuple[int, tuple[float, float]]:
    ijk = world_to_index(image, xyz)
    _check_inside(image, ijk, what)
    index, column, row = _split(ijk, axis, image.array.shape)
    return index, (column, row)


def _box_on_slice(
    image: io.Image, axis: int, corners: list[np.ndarray]
) -> tuple[int, tuple[float, float], tuple[float, float]]:
    # The box's slice is the one through its centre: corners taken from a 3D region may differ in depth.
    centre = (corners[0] + corners[1]) / 2
    index = _split(centre, axis, image.array.shape)[0]
    a, b = (_split(c, axis, image.array.shape)[1:] for c in corners)
    return index, a, b


def _split(ijk: np.ndarray, axis: int, shape: Sequence[int]) -> tuple[int, float, float]:
    """(slice index, column, row) of a continuous voxel index on the slices along array ``axis``.

    Array axis 0 (Z) is index k, 1 (Y) is j and 2 (X) is i; a slice's columns and rows are the remaining
    array axes, last first. Coordinates within half a voxel of the edge are moved onto the edge voxel.
    """
    i, j, k = ijk
    index, column, row = {0: (k, i, j), 1: (j, i, k), 2: (i, j, k)}[axis]
    rows, columns = [n for a, n in enumerate(shape) if a != axis]
    return int(round(index)), float(np.clip(column, 0, columns - 1)), float(np.clip(row, 0, rows - 1))


def _check_inside(image: io.Image, ijk: np.ndarray, what: str) -> None:
    size = np.asarray(image.array.shape[::-1], dtype=np.float64)  # (i, j, k) extents
    if np.any(ijk < -0.5) or np.any(ijk > size - 0.5):
        shown = ", ".join(f"{v:.1f}" for v in ijk)
        raise InputError(
            f"The {what} lies outside the image: voxel index ({shown}), the image has "
            f"{' x '.join(str(int(s)) for s in size)} voxels (i x j x k)"
        )


def mask_prompt(
    path: str, image: io.Image, axis: int, slice_index: int | None, label: int | None
) -> tuple[int, np.ndarray]:
    """(slice, boolean slice mask) from a mask volume on ``image``'s grid or a 2D mask of one slice."""
    values = _read_mask(path)
    name = f"{list(AXES)[axis]} slice"
    if values.ndim == 3:
        if values.shape != image.array.shape:
            raise InputError(
                f"The mask {path} has shape {values.shape} but the image has {image.array.shape} (Z, Y, X): "
                "give a mask on the image's voxel grid, or a 2D mask of one slice"
            )
        selected = values != 0 if label is None else values == label
        if slice_index is None:
            other = tuple(a for a in range(3) if a != axis)
            slice_index = int(np.argmax(selected.sum(axis=other)))
        if not 0 <= slice_index < selected.shape[axis]:
            raise InputError(
                f"--slice {slice_index} is outside the volume: the {list(AXES)[axis]} axis has slices "
                f"0..{selected.shape[axis] - 1}"
            )
        mask = np.take(selected, slice_index, axis=axis)
    else:
        if slice_index is None:
            raise InputError(f"A 2D mask needs --slice K: the {name} it was drawn on")
        rows, columns = [n for a, n in enumerate(image.array.shape) if a != axis]
        if values.shape != (rows, columns):
            raise InputError(
                f"The 2D mask {path} has shape {values.shape} (rows, columns) but a {name} of this image "
                f"has {(rows, columns)}"
            )
        mask = values != 0 if label is None else values == label
    if not mask.any():
        which = "non-zero voxel" if label is None else f"voxel of label {label}"
        raise InputError(f"The mask {path} has no {which} on {name} {slice_index}: the mask prompt is empty")
    return slice_index, mask


def _read_mask(path: str) -> np.ndarray:
    """A mask file's values: ``[Z, Y, X]`` for a volume, ``[H, W]`` for a picture or a one-slice image."""
    if Path(path).suffix.lower() in PICTURE_SUFFIXES:
        values = io.read_2d_image(path)
        return values.max(axis=-1) if values.ndim == 3 else values
    values = io.read_labels(path).array
    return values[0] if values.ndim == 3 and values.shape[0] == 1 else values


def picture_files(folder: str | os.PathLike) -> list[Path]:
    """The 2D pictures of a folder (by suffix), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PICTURE_SUFFIXES)
    if not files:
        raise InputError(f"{folder} holds no images ({', '.join(PICTURE_SUFFIXES)})")
    return files


def template_index(files: Sequence[Path], name: str) -> int:
    """The position of ``--template`` (a file name, with or without its suffix) among ``files``."""
    matches = [i for i, f in enumerate(files) if name in (f.name, f.stem)]
    if len(matches) != 1:
        shown = ", ".join(f.name for f in files[:8]) + (", ..." if len(files) > 8 else "")
        problem = "names several images" if matches else "is not among the images"
        raise InputError(f"--template {name!r} {problem} ({shown}); give the file name")
    return matches[0]


@dataclass
class ImagePrompt:
    """A prompt on one 2D picture: (x, y) pixels, labels 1/0, a box and/or a boolean mask."""

    points: list[list[float]] | None = None
    labels: list[int] | None = None
    box: list[float] | None = None
    mask: np.ndarray | None = None


def image_prompt(args: PromptArgs, size: tuple[int, int]) -> ImagePrompt:
    """The prompt of the ``images`` command, checked against the template's ``(height, width)``."""
    height, width = size
    if args.mask is not None:
        if args.points or args.box:
            raise InputError("Give either --mask or --point/--box: a prompt is a mask or clicks and a box")
        values = _read_mask(args.mask)
        if values.shape != (height, width):
            raise InputError(
                f"The mask {args.mask} has shape {values.shape} but the template is {height} x {width} pixels"
            )
        mask = values != 0 if args.mask_label is None else values == args.mask_label
        if not mask.any():
            raise InputError(f"The mask {args.mask} is empty")
        return ImagePrompt(mask=mask)
    if not args.points and args.box is None:
        raise InputError("Give a prompt on the template: --box, --point (repeatable) or --mask")
    points = [parse_numbers(p, (2, 3), "--point") for p in args.points]
    box = parse_numbers(args.box, (4,), "--box") if args.box is not None else None
    where = f"the template ({width} x {height} pixels)"
    for p in points:
        if not (0 <= p[0] <= width - 1 and 0 <= p[1] <= height - 1):
            raise InputError(f"The point {p[0]:g},{p[1]:g} lies outside {where}")
    if box is not None:
        x0, y0, x1, y1 = box
        if x1 <= x0 or y1 <= y0:
            raise InputError(f"The box {args.box} is empty: it needs x1 > x0 and y1 > y0")
        if x1 < 0 or y1 < 0 or x0 > width - 1 or y0 > height - 1:
            raise InputError(f"The box {args.box} lies outside {where}")
    labels = [_point_label(p[2]) if len(p) == 3 else 1 for p in points]
    return ImagePrompt(points=[p[:2] for p in points] or None, labels=labels or None, box=box)


def check_output(path: str | os.PathLike, suffixes: Sequence[str], what: str) -> Path:
    """Fail early (before any work) on an output name the writer would refuse."""
    path = Path(path)
    if not path.name.lower().endswith(tuple(suffixes)):
        raise InputError(f"{what} {path.name!r} must end with one of {', '.join(suffixes)}")
    if not path.parent.is_dir():
        raise InputError(f"Cannot write {path}: the folder {path.parent} does not exist")
    return path
