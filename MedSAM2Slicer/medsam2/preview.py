"""PNG previews of a result, drawn with numpy alone: the prompt slice with its prompt, and orthogonal views.

A volume preview is one row of panels: the prompted slice with the prompt and the result, then the axial,
coronal and sagittal slices through the centre of the result. Panels keep the physical aspect ratio of their
pixels. A preview of 2D images is a contact sheet of the images with their masks, the template first.
Colours: result filled and outlined in orange (further objects in other colours), box in yellow, positive
points green, negative points red, a mask prompt outlined in cyan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .prompts import AXIS_NAMES, Prompt

PANEL_HEIGHT = 256
THUMBNAIL_HEIGHT = 160
MAX_THUMBNAILS = 30
THUMBNAILS_PER_ROW = 5
TITLE_HEIGHT = 20
GAP = 4
FILL_ALPHA = 0.35
OUTLINE_WIDTH = 2

BACKGROUND = (16, 16, 16)
TITLE_BACKGROUND = (32, 32, 32)
TEXT = (235, 235, 235)
RESULT_COLORS = ((255, 140, 0), (0, 170, 255), (255, 0, 200), (140, 255, 60), (180, 120, 255))
BOX_COLOR = (255, 255, 0)
POSITIVE_COLOR = (0, 230, 0)
NEGATIVE_COLOR = (255, 40, 40)
MASK_PROMPT_COLOR = (0, 255, 255)
POINT_RADIUS = 4

# A 5x7 bitmap font: seven rows per glyph, five bits per row (most significant bit on the left), in hex.
_GLYPHS = {
    "0": "0E11131519110E",
    "1": "040C040404040E",
    "2": "0E11010204081F",
    "3": "1F02040201110E",
    "4": "02060A121F0202",
    "5": "1F101E0101110E",
    "6": "0608101E11110E",
    "7": "1F010204080808",
    "8": "0E11110E11110E",
    "9": "0E11110F01020C",
    "A": "0E1111111F1111",
    "B": "1E11111E11111E",
    "C": "0E11101010110E",
    "D": "1C12111111121C",
    "E": "1F10101E10101F",
    "F": "1F10101E101010",
    "G": "0E11101711110F",
    "H": "1111111F111111",
    "I": "0E04040404040E",
    "J": "0702020202120C",
    "K": "11121418141211",
    "L": "1010101010101F",
    "M": "111B1515111111",
    "N": "11111915131111",
    "O": "0E11111111110E",
    "P": "1E11111E101010",
    "Q": "0E11111115120D",
    "R": "1E11111E141211",
    "S": "0F10100E01011E",
    "T": "1F040404040404",
    "U": "1111111111110E",
    "V": "11111111110A04",
    "W": "1111111515150A",
    "X": "11110A040A1111",
    "Y": "1111110A040404",
    "Z": "1F01020408101F",
    " ": "00000000000000",
    ".": "00000000000C0C",
    ",": "000000000C0408",
    ":": "000C0C000C0C00",
    "-": "0000001F000000",
    "+": "0004041F040400",
    "=": "00001F001F0000",
    "(": "02040808080402",
    ")": "08040202020408",
    "/": "00010204081000",
    "%": "18190204081303",
    "_": "0000000000001F",
    "?": "0E110102040004",
}
_GLYPH_BITS = {
    char: np.array(
        [[(int(code[2 * r : 2 * r + 2], 16) >> (4 - c)) & 1 for c in range(5)] for r in range(7)],
        dtype=bool,
    )
    for char, code in _GLYPHS.items()
}


@dataclass
class Marks:
    """A prompt in a panel's pixel coordinates: ``points`` ``[N, 2]`` (x, y) with ``point_labels`` 1/0,
    ``box`` (x0, y0, x1, y1), ``mask`` boolean ``[H, W]``."""

    points: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    box: np.ndarray | None = None
    mask: np.ndarray | None = None

    @classmethod
    def of(cls, prompt: Prompt) -> Marks:
        return cls(prompt.points, prompt.labels, prompt.box, prompt.mask)


def volume_preview(
    intensities: np.ndarray,
    labels: np.ndarray,
    prompts: Sequence[Prompt],
    spacing_zyx: Sequence[float] | None = None,
    superior_up: bool = False,
) -> np.ndarray:
    """``[H, W, 3]`` uint8: the first prompt's slice with the prompts on it, then axial, coronal and
    sagittal slices through the centre of the result (through the prompt when the result is empty).

    ``intensities`` ``[Z, Y, X]`` in [0, 1] (as the model saw them), ``labels`` ``[Z, Y, X]`` object ids.
    ``superior_up`` shows coronal and sagittal slices with increasing slice index (Z) at the top.
    """
    spacing = tuple(float(s) for s in (spacing_zyx or (1.0, 1.0, 1.0)))
    first = prompts[0]
    on_slice = [p for p in prompts if (p.axis, p.index) == (first.axis, first.index)]
    panels = [
        _volume_panel(
            f"prompt: {AXIS_NAMES[first.axis]} {first.index}",
            intensities,
            labels,
            first.axis,
            first.index,
            spacing,
            superior_up,
            [Marks.of(p) for p in on_slice],
        )
    ]
    centre = _centre(labels, first)
    for axis in range(3):
        panels.append(
            _volume_panel(
                f"{AXIS_NAMES[axis]} {centre[axis]}",
                intensities,
                labels,
                axis,
                centre[axis],
                spacing,
                superior_up,
                [],
            )
        )
    empty = not labels.any()
    return _with_legend(_row(panels), empty, bool(first.mask is not None))


def images_preview(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    names: Sequence[str],
    template: int,
    marks: Marks,
) -> np.ndarray:
    """``[H, W, 3]`` uint8 contact sheet: the template with its prompt, then the other images, each with its
    mask (at most ``MAX_THUMBNAILS`` images)."""
    order = [template] + [i for i in range(len(images)) if i != template]
    tiles = []
    for i in order[:MAX_THUMBNAILS]:
        title = f"template {names[i]}" if i == template else names[i]
        image = _unit_range(np.asarray(images[i]))
        tiles.append(
            render_panel(
                title,
                image,
                np.asarray(masks[i], np.uint8),
                marks=[marks] if i == template else [],
                height=THUMBNAIL_HEIGHT,
            )
        )
    rows = [_row(tiles[k : k + THUMBNAILS_PER_ROW]) for k in range(0, len(tiles), THUMBNAILS_PER_ROW)]
    width = max(r.shape[1] for r in rows)
    sheet = np.concatenate([_pad_to_width(r, width) for r in rows], axis=0)
    hidden = len(images) - len(tiles)
    return _with_legend(sheet, False, marks.mask is not None, f"+{hidden} more images" if hidden > 0 else "")


def render_panel(
    title: str,
    image: np.ndarray,
    labels: np.ndarray,
    pixel_size: Sequence[float] = (1.0, 1.0),
    marks: Sequence[Marks] = (),
    flip_rows: bool = False,
    height: int = PANEL_HEIGHT,
) -> np.ndarray:
    """One titled panel ``[TITLE_HEIGHT + height, W, 3]``: ``image`` (``[h, w]`` or ``[h, w, 3]`` in [0, 1])
    scaled to ``height`` rows with its pixels' aspect ``pixel_size`` (row, column) kept, ``labels`` filled
    and outlined, the prompt ``marks`` drawn on top."""
    rows, columns = image.shape[:2]
    width = panel_width(image.shape[:2], pixel_size, height)
    row_index, column_index = _nearest(rows, height), _nearest(columns, width)
    picture = image[np.ix_(row_index, column_index)].astype(np.float32)
    rgb = np.repeat(picture[..., None], 3, axis=-1) if picture.ndim == 2 else picture.copy()
    rgb *= 255.0
    shown = np.asarray(labels)[np.ix_(row_index, column_index)]
    for k, obj in enumerate(int(v) for v in np.unique(shown) if v != 0):
        color = np.asarray(RESULT_COLORS[k % len(RESULT_COLORS)], np.float32)
        inside = shown == obj
        rgb[inside] = (1 - FILL_ALPHA) * rgb[inside] + FILL_ALPHA * color
        rgb[_outline(inside, OUTLINE_WIDTH)] = color
    for m in marks:
        _draw_marks(rgb, m, (rows, columns), row_index, column_index)
    picture = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    if flip_rows:
        picture = picture[::-1]
    return np.concatenate([_title_bar(title, width), picture], axis=0)


def panel_width(shape: Sequence[int], pixel_size: Sequence[float], height: int = PANEL_HEIGHT) -> int:
    """Width of a panel ``height`` rows high showing an image of ``shape`` (rows, columns) whose pixels
    measure ``pixel_size`` (row, column), kept within 1/4 and 3 times the height."""
    rows, columns = shape
    aspect = (columns * float(pixel_size[1])) / (rows * float(pixel_size[0]))
    return int(np.clip(round(height * aspect), height // 4, 3 * height))


def to_panel(x: float, y: float, shape: Sequence[int], size: Sequence[int]) -> tuple[int, int]:
    """Pixel ``(x, y)`` of an image of ``shape`` (rows, columns) -> (column, row) in a panel picture of
    ``size`` (height, width), below the title bar."""
    rows, columns = shape
    height, width = size
    return int(round((x + 0.5) * width / columns - 0.5)), int(round((y + 0.5) * height / rows - 0.5))


def draw_text(rgb: np.ndarray, text: str, x: int, y: int, color: Sequence[int], scale: int = 1) -> int:
    """Write ``text`` (upper-cased, 5x7 glyphs) with its top-left corner at ``(x, y)``; returns the x after
    the last glyph. Glyphs that do not fit are clipped."""
    for char in text.upper():
        glyph = _GLYPH_BITS.get(char, _GLYPH_BITS["?"])
        block = np.kron(glyph, np.ones((scale, scale), dtype=bool))
        target = rgb[y : y + block.shape[0], x : x + block.shape[1]]
        target[block[: target.shape[0], : target.shape[1]]] = color
        x += 6 * scale
    return x


# -------------------------------------------------------------------------------------------- internals


def _volume_panel(
    title: str,
    intensities: np.ndarray,
    labels: np.ndarray,
    axis: int,
    index: int,
    spacing: tuple[float, ...],
    superior_up: bool,
    marks: list[Marks],
) -> np.ndarray:
    image = np.take(intensities, index, axis=axis)
    shown = np.take(labels, index, axis=axis)
    pixel_size = [s for a, s in enumerate(spacing) if a != axis]
    # Axis 0 is Z: coronal and sagittal slices have Z along their rows.
    return render_panel(title, image, shown, pixel_size, marks, flip_rows=superior_up and axis != 0)


def _centre(labels: np.ndarray, prompt: Prompt) -> tuple[int, int, int]:
    """The result's centre of mass (voxel), or the prompt's position when the result is empty."""
    if labels.any():
        return tuple(int(round(float(c))) for c in np.argwhere(labels).mean(axis=0))
    if prompt.mask is not None:
        row, column = np.argwhere(prompt.mask).mean(axis=0)
    elif prompt.box is not None:
        column, row = (prompt.box[:2] + prompt.box[2:]) / 2
    else:
        column, row = np.asarray(prompt.points).mean(axis=0)
    # A slice's rows and columns are the two other array axes, in order.
    centre = [int(round(float(row))), int(round(float(column)))]
    centre.insert(prompt.axis, prompt.index)
    return tuple(centre)


def _draw_marks(
    rgb: np.ndarray, marks: Marks, shape: tuple[int, int], rows: np.ndarray, columns: np.ndarray
) -> None:
    """Draw ``marks`` given on an image of ``shape`` onto its panel picture (sampled at ``rows``, ``columns``)."""
    height, width = rgb.shape[:2]
    if marks.mask is not None:
        shown = np.asarray(marks.mask, bool)[np.ix_(rows, columns)]
        rgb[_outline(shown, OUTLINE_WIDTH)] = MASK_PROMPT_COLOR
    if marks.box is not None:
        x0, y0 = to_panel(marks.box[0], marks.box[1], shape, (height, width))
        x1, y1 = to_panel(marks.box[2], marks.box[3], shape, (height, width))
        _rectangle(rgb, x0, y0, x1, y1, BOX_COLOR)
    if marks.points is not None:
        point_labels = marks.point_labels if marks.point_labels is not None else [1] * len(marks.points)
        for (x, y), label in zip(np.asarray(marks.points), point_labels):
            column, row = to_panel(x, y, shape, (height, width))
            _disc(rgb, column, row, POSITIVE_COLOR if int(label) == 1 else NEGATIVE_COLOR)


def _rectangle(rgb: np.ndarray, x0: int, y0: int, x1: int, y1: int, color: Sequence[int]) -> None:
    height, width = rgb.shape[:2]
    x0, x1 = sorted((int(np.clip(x0, 0, width - 1)), int(np.clip(x1, 0, width - 1))))
    y0, y1 = sorted((int(np.clip(y0, 0, height - 1)), int(np.clip(y1, 0, height - 1))))
    t = OUTLINE_WIDTH
    rgb[y0 : y0 + t, x0 : x1 + 1] = color
    rgb[max(y1 - t + 1, 0) : y1 + 1, x0 : x1 + 1] = color
    rgb[y0 : y1 + 1, x0 : x0 + t] = color
    rgb[y0 : y1 + 1, max(x1 - t + 1, 0) : x1 + 1] = color


def _disc(rgb: np.ndarray, column: int, row: int, color: Sequence[int]) -> None:
    """A filled disc with a black rim, readable on any background."""
    rr, cc = np.ogrid[: rgb.shape[0], : rgb.shape[1]]
    distance = (rr - row) ** 2 + (cc - column) ** 2
    rgb[distance <= (POINT_RADIUS + 1) ** 2] = 0
    rgb[distance <= POINT_RADIUS**2] = color


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """The mask's pixels within ``width`` pixels (4-neighbour steps) of its border or of the picture's."""
    inner = mask.copy()
    for _ in range(width):
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        shrunk[[0, -1], :] = False
        shrunk[:, [0, -1]] = False
        inner = shrunk
    return mask & ~inner


def _nearest(source: int, target: int) -> np.ndarray:
    """Source indices that nearest-neighbour scaling from ``source`` to ``target`` samples."""
    return np.minimum(((np.arange(target) + 0.5) * source / target).astype(np.int64), source - 1)


def _unit_range(image: np.ndarray) -> np.ndarray:
    """A picture as float in [0, 1]: uint8 divided by 255, anything else min-max scaled."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    image = image.astype(np.float32)
    low, high = float(image.min()), float(image.max())
    return (image - low) / (high - low) if high > low else np.zeros_like(image)


def _title_bar(title: str, width: int) -> np.ndarray:
    bar = np.empty((TITLE_HEIGHT, width, 3), np.uint8)
    bar[:] = TITLE_BACKGROUND
    scale = 2 if len(title) * 12 + 8 <= width else 1
    top = (TITLE_HEIGHT - 7 * scale) // 2
    draw_text(bar, title, 4, top, TEXT, scale)
    return bar


def _row(panels: Sequence[np.ndarray]) -> np.ndarray:
    """Panels side by side on the background, ``GAP`` pixels apart and around."""
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + GAP * (len(panels) + 1)
    row = np.empty((height + 2 * GAP, width, 3), np.uint8)
    row[:] = BACKGROUND
    x = GAP
    for p in panels:
        row[GAP : GAP + p.shape[0], x : x + p.shape[1]] = p
        x += p.shape[1] + GAP
    return row


def _pad_to_width(picture: np.ndarray, width: int) -> np.ndarray:
    padded = np.empty((picture.shape[0], width, 3), np.uint8)
    padded[:] = BACKGROUND
    padded[:, : picture.shape[1]] = picture
    return padded


def _with_legend(picture: np.ndarray, empty: bool, mask_prompt: bool, note: str = "") -> np.ndarray:
    """A line below the picture saying what the colours mean."""
    bar = np.empty((TITLE_HEIGHT, picture.shape[1], 3), np.uint8)
    bar[:] = BACKGROUND
    entries = [("result: empty" if empty else "result", RESULT_COLORS[0])]
    entries += [("mask prompt", MASK_PROMPT_COLOR)] if mask_prompt else []
    entries += [("box", BOX_COLOR), ("+ point", POSITIVE_COLOR), ("- point", NEGATIVE_COLOR)]
    entries += [(note, TEXT)] if note else []
    characters = sum(len(text) + 2 for text, _ in entries)
    scale = 2 if GAP + 4 + characters * 12 <= picture.shape[1] else 1
    x = GAP + 4
    for text, color in entries:
        x = draw_text(bar, text, x, (TITLE_HEIGHT - 7 * scale) // 2, color, scale) + 12 * scale
    return np.concatenate([picture, bar], axis=0)
