"""PNG previews: panel layout, overlay and prompt colours, and the preview that ``medsam2 segment`` writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import medsam2
from medsam2 import io
from medsam2.cli import main
from medsam2.preprocess import prepare_intensities
from medsam2.preview import (
    BOX_COLOR,
    FILL_ALPHA,
    GAP,
    NEGATIVE_COLOR,
    PANEL_HEIGHT,
    POSITIVE_COLOR,
    RESULT_COLORS,
    THUMBNAIL_HEIGHT,
    TITLE_HEIGHT,
    Marks,
    draw_text,
    images_preview,
    panel_width,
    render_panel,
    to_panel,
    volume_preview,
)
from medsam2.prompts import Prompt

ORANGE = np.array(RESULT_COLORS[0], np.float64)


def _blend(grey: float, color=ORANGE) -> np.ndarray:
    return np.rint((1 - FILL_ALPHA) * grey + FILL_ALPHA * np.asarray(color, np.float64))


def test_panel_draws_result_and_prompt_where_they_are():
    image = np.full((40, 60), 0.5, np.float32)
    labels = np.zeros((40, 60), np.uint8)
    labels[10:30, 20:40] = 1
    marks = Marks(points=np.array([[50.0, 30.0], [10.0, 35.0]]), point_labels=np.array([1, 0]),
                  box=np.array([4.0, 3.0, 56.0, 37.0]))  # fmt: skip
    panel = render_panel("test", image, labels, marks=[marks], height=80)
    assert panel.shape == (TITLE_HEIGHT + 80, 120, 3)  # 2x scale keeps the square pixels
    picture = panel[TITLE_HEIGHT:].astype(np.float64)
    grey = 0.5 * 255
    np.testing.assert_array_equal(picture[40, 60], _blend(grey))  # inside the result: tinted
    np.testing.assert_array_equal(picture[20, 60], ORANGE)  # its top edge: outlined
    np.testing.assert_array_equal(picture[21, 60], ORANGE)  # two pixels wide
    np.testing.assert_array_equal(picture[22, 60], _blend(grey))
    np.testing.assert_array_equal(picture[60, 15], [np.rint(grey)] * 3)  # untouched background
    for (x, y), color in (((4.0, 3.0), BOX_COLOR), ((56.0, 37.0), BOX_COLOR), ((50.0, 30.0), POSITIVE_COLOR),
                          ((10.0, 35.0), NEGATIVE_COLOR)):  # fmt: skip
        column, row = to_panel(x, y, (40, 60), (80, 120))
        np.testing.assert_array_equal(picture[row, column], color)
    # the box's sides run between its corners
    left, top = to_panel(4.0, 3.0, (40, 60), (80, 120))
    np.testing.assert_array_equal(picture[40, left], BOX_COLOR)
    np.testing.assert_array_equal(picture[top, 30], BOX_COLOR)

    flipped = render_panel("test", image, labels, marks=[marks], flip_rows=True, height=80)
    np.testing.assert_array_equal(flipped[TITLE_HEIGHT:], panel[TITLE_HEIGHT:][::-1])
    np.testing.assert_array_equal(flipped[:TITLE_HEIGHT], panel[:TITLE_HEIGHT])  # titles stay readable


def test_text_uses_the_5x7_glyphs():
    canvas = np.zeros((10, 40, 3), np.uint8)
    end = draw_text(canvas, "I1", 1, 1, (255, 0, 0))
    assert end == 13
    lit = canvas[..., 0] > 0
    assert lit[1:8, 1:6].sum() == 11 and lit[1:8, 7:12].sum() == 10  # "I": 3+5+3 pixels, "1": 1+2+1+1+1+1+3
    assert lit[:, 2].sum() == 2 and lit[:, 3].sum() == 7  # the I's stem is the middle column
    scaled = np.zeros((20, 20, 3), np.uint8)
    draw_text(scaled, "I", 0, 0, (9, 9, 9), scale=2)
    assert (scaled[..., 0] > 0).sum() == 4 * 11


def test_volume_preview_layout_orientation_and_centre():
    volume = np.zeros((10, 20, 30), np.float32)
    volume[:, 5:15, 10:20] = 1.0
    volume[0] = 0.5  # the lowest slice (z = 0) marks where the feet are
    labels = np.zeros(volume.shape, np.uint8)
    labels[2:8, 6:14, 12:18] = 1  # centre of mass (4.5, 9.5, 14.5)
    prompt = Prompt(axis=1, index=9, box=(11, 2, 19, 8))
    spacing = (2.0, 1.0, 1.0)
    picture = volume_preview(volume, labels, [prompt], spacing, superior_up=True)

    widths = [
        panel_width((10, 30), (2.0, 1.0)),  # the prompt's coronal slice [Z, X]
        panel_width((20, 30), (1.0, 1.0)),  # axial [Y, X]
        panel_width((10, 30), (2.0, 1.0)),  # coronal [Z, X]
        panel_width((10, 20), (2.0, 1.0)),  # sagittal [Z, Y]
    ]
    assert widths == [384, 384, 384, 256]
    assert picture.shape == (2 * GAP + TITLE_HEIGHT + PANEL_HEIGHT + TITLE_HEIGHT, sum(widths) + 5 * GAP, 3)

    top = GAP + TITLE_HEIGHT
    lefts = np.cumsum([GAP] + [w + GAP for w in widths[:-1]])
    # Coronal panels with superior up: the z = 0 slice (grey 0.5) is the bottom row, not the top one.
    coronal = picture[top : top + PANEL_HEIGHT, lefts[2] : lefts[2] + widths[2]]
    np.testing.assert_array_equal(coronal[-1, 2], [128, 128, 128])
    assert coronal[0, 2].tolist() == [0, 0, 0]
    # The axial panel goes through the result's centre: its middle pixel is inside the tinted result.
    axial = picture[top : top + PANEL_HEIGHT, lefts[1] : lefts[1] + widths[1]].astype(np.float64)
    column, row = to_panel(15, 10, (20, 30), (PANEL_HEIGHT, widths[1]))
    np.testing.assert_array_equal(axial[row, column], _blend(255.0))
    # The prompt panel shows the box on coronal slice 9 (rows flipped for superior up).
    prompt_panel = picture[top : top + PANEL_HEIGHT, lefts[0] : lefts[0] + widths[0]]
    column, row = to_panel(11, 2, (10, 30), (PANEL_HEIGHT, widths[0]))
    np.testing.assert_array_equal(prompt_panel[PANEL_HEIGHT - 1 - row, column], BOX_COLOR)


def test_images_contact_sheet_puts_the_template_first_with_its_prompt():
    images = [np.full((30, 40), 60, np.uint8), np.full((50, 50, 3), 200, np.uint8)]
    masks = [np.zeros((30, 40), bool), np.ones((50, 50), bool)]
    sheet = images_preview(images, masks, ["a.png", "b.png"], 1, Marks(box=np.array([5.0, 5.0, 40.0, 40.0])))
    first, second = THUMBNAIL_HEIGHT, panel_width((30, 40), (1, 1), THUMBNAIL_HEIGHT)
    assert sheet.shape == (
        2 * GAP + TITLE_HEIGHT + THUMBNAIL_HEIGHT + TITLE_HEIGHT,
        first + second + 3 * GAP,
        3,
    )
    template = sheet[GAP + TITLE_HEIGHT :, GAP : GAP + first]
    column, row = to_panel(5, 5, (50, 50), (THUMBNAIL_HEIGHT, first))
    np.testing.assert_array_equal(template[row, column], BOX_COLOR)
    np.testing.assert_array_equal(template[80, 80], _blend(200.0))  # its mask covers it all
    other = sheet[GAP + TITLE_HEIGHT :, 2 * GAP + first : 2 * GAP + first + second]
    np.testing.assert_array_equal(other[80, 100], [60, 60, 60])  # empty mask: picture unchanged


def test_segment_preview_shows_the_prompt_slice_and_the_result(tmp_path, capsys):
    slicerio = pytest.importorskip("slicerio")
    ct_file = Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd"
    fields = json.loads((Path(__file__).parent / "data" / "golden" / "sam2.1" / "meta.json").read_text())[
        "config"
    ]
    (tmp_path / "tiny.json").write_text(json.dumps(fields))
    config = medsam2.ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    torch.manual_seed(0)
    checkpoint = medsam2.save_state_dict(medsam2.build_model(config), tmp_path / "tiny.safetensors")
    out, png = tmp_path / "out.nrrd", tmp_path / "preview.png"
    code = main(
        ["segment", str(ct_file), "-o", str(out), "--slice", "31", "--box", "40,30,90,80", "--orientations", "1",
         "--preview", str(png), "--model", str(checkpoint), "--config", str(tmp_path / "tiny.json"),
         "--device", "cpu"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    picture = io.read_2d_image(png)
    # CT: 128 x 128 axial pixels of 3.05 mm, 34 slices of 10 mm: coronal and sagittal panels are 294 wide.
    assert picture.shape == (
        2 * GAP + TITLE_HEIGHT + PANEL_HEIGHT + TITLE_HEIGHT,
        256 + 256 + 294 + 294 + 5 * GAP,
        3,
    )

    ct = io.read_image(ct_file)
    grey = prepare_intensities(ct.array)[31] * 255.0
    labels = io.read_labels(out).array[31]
    panel = picture[GAP + TITLE_HEIGHT : GAP + TITLE_HEIGHT + PANEL_HEIGHT, GAP : GAP + 256].astype(
        np.float64
    )
    interior = labels.astype(bool)  # voxels whose 8 neighbours are in the result too: clear of the outline
    for shift in ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1)):
        interior &= np.roll(labels.astype(bool), shift, axis=(0, 1))
    interior[[0, -1], :] = interior[:, [0, -1]] = False
    box = np.zeros_like(interior)
    box[28:83, 38:93] = True  # the box's drawn edges and a margin
    inside = np.argwhere(interior & ~box)
    outside = np.argwhere(~labels.astype(bool) & ~box)
    assert len(inside) > 20 and len(outside) > 20, "the random model should give some object and background"
    for y, x in inside[:: len(inside) // 10][:10]:  # the display pixel (2y, 2x) samples voxel (y, x)
        np.testing.assert_allclose(panel[2 * y, 2 * x], _blend(grey[y, x]), atol=1)
    for y, x in outside[:: len(outside) // 10][:10]:
        np.testing.assert_allclose(panel[2 * y, 2 * x], [grey[y, x]] * 3, atol=1)
    column, row = to_panel(40, 55, (128, 128), (PANEL_HEIGHT, 256))
    np.testing.assert_array_equal(panel[row, column], BOX_COLOR)
