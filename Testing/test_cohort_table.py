"""``medsam2 cohort`` without Ray: reading and checking the table, RECIST lines, parameter hashes, and that the
engine and the command line work when Ray is not installed."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medsam2 import io
from medsam2.cohort.plan import ModelChoice, make_groups
from medsam2.cohort.prompt import engine_prompts
from medsam2.cohort.recist import recist_box
from medsam2.cohort.rows import BadRow, RowSpec, Settings, check_rows
from medsam2.cohort.table import read_table
from medsam2.errors import InputError

GOLDEN = Path(__file__).parent / "data" / "golden" / "sam2.1"
MODEL = str(GOLDEN / "weights.safetensors")
DEFAULTS = Settings(model=MODEL)
HEADER = "image,structure,box,point,recist,slice,axis,world,orientations,patient"


def _table(folder: Path, *lines: str, header: str = HEADER, name: str = "table.csv") -> Path:
    path = folder / name
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


def _checked(folder: Path, *lines: str, header: str = HEADER) -> list[RowSpec | BadRow]:
    return check_rows(read_table(_table(folder, *lines, header=header)), DEFAULTS)


# ----------------------------------------------------------------------------------------------- RECIST


def test_recist_box_is_the_square_on_the_line_as_bowang_lab_draws_it():
    # Endpoints (40, 50) and (60, 65): length sqrt(20^2 + 15^2) = 25 px, midpoint (50, 57.5), half side 12.5.
    assert recist_box((40, 50), (60, 65)) == pytest.approx((37.5, 45.0, 62.5, 70.0))
    # The endpoints' order does not matter; a line at 45 degrees gives a square wider than its own extent.
    assert recist_box((60, 65), (40, 50)) == pytest.approx((37.5, 45.0, 62.5, 70.0))
    half = 10 * math.sqrt(2)  # (10, 10) to (30, 30): length 20 * sqrt(2)
    assert recist_box((10, 10), (30, 30)) == pytest.approx((20 - half, 20 - half, 20 + half, 20 + half))


def test_recist_box_is_square_in_millimetres_and_clamped_to_the_slice():
    # Columns 0.5 mm, rows 1 mm: the line spans 10 mm across and 15 mm down, 18.028 mm long; half a side is
    # 9.014 mm = 18.028 columns or 9.014 rows around the midpoint (50, 57.5).
    half_mm = math.sqrt(10**2 + 15**2) / 2
    expected = (50 - half_mm / 0.5, 57.5 - half_mm, 50 + half_mm / 0.5, 57.5 + half_mm)
    assert recist_box((40, 50), (60, 65), spacing=(0.5, 1.0)) == pytest.approx(expected)
    # Near the corner of a 64 x 64 slice the square is cut at the first and last pixel, as bowang-lab clamps.
    assert recist_box((2, 3), (12, 3), size=(64, 64)) == pytest.approx((2.0, 0.0, 12.0, 8.0))
    assert recist_box((55, 60), (63, 60), size=(64, 64)) == pytest.approx((55.0, 56.0, 63.0, 63.0))
    with pytest.raises(InputError, match="no length"):
        recist_box((5, 5), (5, 5))


def test_a_recist_row_becomes_the_hand_computed_box_in_voxels_and_in_mm(tmp_path):
    # A 20 x 80 x 100 volume (Z, Y, X) with 0.5 mm columns, 1 mm rows, 2.5 mm slices, shifted in space.
    image = io.Image.from_array(
        np.arange(20 * 80 * 100, dtype=np.int16).reshape(20, 80, 100),
        spacing=(0.5, 1.0, 2.5),
        origin=(-10.0, 20.0, 30.0),
    )
    sitk.WriteImage(image.sitk_image, str(tmp_path / "ct.nrrd"))
    physical = image.to_sitk(image.array).TransformContinuousIndexToPhysicalPoint
    ends = [*physical((40.0, 50.0, 7.0)), *physical((60.0, 65.0, 7.0))]
    rows = _checked(
        tmp_path,
        'ct.nrrd,lesion,,,"40,50,60,65",7,,,,',
        f'ct.nrrd,lesion mm,,,"{",".join(map(str, ends))}",,,true,,',
    )
    half_mm = math.sqrt(10**2 + 15**2) / 2
    expected = (50 - half_mm / 0.5, 57.5 - half_mm, 50 + half_mm / 0.5, 57.5 + half_mm)
    for row in rows:
        assert isinstance(row, RowSpec), row
        (prompt,) = engine_prompts(row.prompt, io.read_image(row.image), obj_id=3)
        assert (prompt.axis, prompt.index, prompt.obj_id) == (0, 7, 3)
        np.testing.assert_allclose(prompt.box, expected, atol=1e-6)
        assert prompt.points is None


def test_recist_endpoints_must_share_a_slice_and_lie_in_the_image(tmp_path):
    image = io.Image.from_array(np.arange(10 * 30 * 30, dtype=np.int16).reshape(10, 30, 30))
    split, outside = _checked(
        tmp_path, 'ct.nrrd,a,,,"1,1,2,5,5,6",,,true,,', 'ct.nrrd,b,,,"1,1,40,5",4,,,,'
    )  # fmt: skip
    with pytest.raises(InputError, match=r"RECIST endpoints .* lie on different axial slices \(2, 6\)"):
        engine_prompts(split.prompt, image, 1)
    with pytest.raises(InputError, match="point lies outside the axial slice"):
        engine_prompts(outside.prompt, image, 1)


# ------------------------------------------------------------------------------------------------ table


def test_csv_and_parquet_tables_give_the_same_rows(tmp_path):
    parquet = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    csv_path = _table(tmp_path, 'ct.nrrd,liver,"1,2,30,40",,,12,,,2,P-7', "ct.nrrd,spleen,,5;6;7,,3,,,,")
    columns = {
        "image": ["ct.nrrd", "ct.nrrd"],
        "structure": ["liver", "spleen"],
        "box": ["1,2,30,40", None],
        "point": [None, "5;6;7"],
        "slice": [12, 3],  # integers, as Parquet keeps them
        "orientations": [2.0, float("nan")],  # a gap makes an integer column float in pandas-made files
        "patient": ["P-7", None],
    }
    parquet.write_table(pyarrow.table(columns), tmp_path / "table.parquet")
    from_csv, from_parquet = read_table(csv_path), read_table(tmp_path / "table.parquet")
    for a, b in zip(from_csv.rows, from_parquet.rows):
        assert {k: v for k, v in a.cells.items() if v is not None} == {
            k: v for k, v in b.cells.items() if v is not None
        }
        assert a.extra == b.extra
    assert from_parquet.rows[0].cells["slice"] == "12" and from_parquet.rows[0].cells["orientations"] == "2"
    assert from_parquet.rows[1].get("orientations") is None
    assert from_csv.extra_columns == ("patient",) and from_csv.rows[0].extra == {"patient": "P-7"}


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("image,box", "no 'structure' column"),
        ("image,structure,slice", "no prompt column"),
        ("image,structure,box,slcie", "column 'slcie': did you mean 'slice'"),
        ("image,structure,box,box", "names the column 'box' twice"),
        ("image,structure,box", "Row 1 of the table .* has more cells than the header has columns"),
    ],
)
def test_table_level_problems_stop_before_any_work(tmp_path, header, message):
    with pytest.raises(InputError, match=message):
        read_table(_table(tmp_path, "a.nrrd,x,1,2", header=header))


def test_rows_that_would_write_the_same_output_are_refused(tmp_path):
    with pytest.raises(InputError, match=r"Rows 1 and 2 would both write 'ct_liver'.*id column"):
        _checked(tmp_path, 'ct.nii.gz,liver,"1,1,5,5",,,1,,,,', 'sub/ct.nrrd,liver,"1,1,5,5",,,1,,,,')


def test_a_bad_row_fails_alone_with_its_reason(tmp_path):
    rows = _checked(
        tmp_path,
        'ct.nrrd,ok,"1,1,5,5",,,1,,,,',
        'ct.nrrd,two prompts,"1,1,5,5",,"1,1,4,4",1,,,,',
        "ct.nrrd,no prompt,,,,1,,,,",
        'ct.nrrd,bad axis,"1,1,5,5",,,1,axil,,,',
        'ct.nrrd,bad slice,"1,1,5,5",,,first,,,,',
        'ct.nrrd,bad orientations,"1,1,5,5",,,1,,,3,',
        'ct.nrrd,bad world,"1,1,5,5",,,1,,maybe,,',
        ',no image,"1,1,5,5",,,1,,,,',
    )
    assert isinstance(rows[0], RowSpec) and rows[0].id == "ct_ok"
    errors = {r.structure: r.error for r in rows[1:]}
    assert all(isinstance(r, BadRow) for r in rows[1:])
    assert "either a recist line or a box" in errors["two prompts"]
    assert "no prompt" in errors["no prompt"]
    assert "axis 'axil' is not one of axial, coronal, sagittal" in errors["bad axis"]
    assert "slice must be a whole number, got 'first'" in errors["bad slice"]
    assert "orientations must be 1, 2 or 6, got 3" in errors["bad orientations"]
    assert "world must be true or false" in errors["bad world"]
    assert errors["no image"] == "The row has no image" and rows[-1].id == "row8"


# ----------------------------------------------------------------------------------------------- hashes


def test_a_rows_hash_covers_its_group_and_nothing_else(tmp_path):
    lines = [
        'a.nrrd,liver,"1,1,5,5",,,1,,,,P1',
        'a.nrrd,spleen,"6,6,9,9",,,1,,,,P1',
        'b.nrrd,liver,"1,1,5,5",,,1,,,,P2',
    ]

    def hashes(*rows: str, choice: ModelChoice | None = None) -> dict[str, str]:
        groups = make_groups(_checked(tmp_path, *rows), choice or ModelChoice())
        return {r.id: h for g in groups for r, h in zip(g.rows, g.hashes)}

    base = hashes(*lines)
    assert len(set(base.values())) == 3
    # a carried column changes nothing
    assert hashes(*[line.replace("P1", "P9") for line in lines]) == base
    # the spleen's box changes both rows of image a (segmented together), not image b's
    moved = hashes(lines[0], lines[1].replace("6,6,9,9", "6,6,9,10"), lines[2])
    assert moved["a_liver"] != base["a_liver"] and moved["a_spleen"] != base["a_spleen"]
    assert moved["b_liver"] == base["b_liver"]
    # so do the model's configuration and a row's own settings (which also split the group)
    assert hashes(*lines, choice=ModelChoice(image_size=64))["b_liver"] != base["b_liver"]
    two = hashes(lines[0], lines[1], lines[2].replace(",,,,P2", ",,,2,P2"))
    assert two["b_liver"] != base["b_liver"] and two["a_liver"] == base["a_liver"]


# ------------------------------------------------------------------------------------------ without Ray


def test_the_engine_and_the_command_line_work_without_ray(tmp_path):
    """Ray is an optional extra: with it made unimportable, ``import medsam2`` and the command line still
    work, nothing imports Ray on the way, and ``medsam2 cohort`` says how to install it."""
    table = _table(tmp_path, 'ct.nrrd,liver,"1,1,5,5",,,1,,,,')
    script = f"""
import sys
import medsam2, medsam2.cli, medsam2.cohort
assert "ray" not in sys.modules, "importing the engine or the command line imported Ray"
sys.modules["ray"] = None  # import ray now raises ImportError
assert medsam2.cli.main(["--version"]) == 0
assert medsam2.cli.main(["cohort", "--help"]) == 0
code = medsam2.cli.main(["cohort", {str(table)!r}, "--out", {str(tmp_path / "out")!r}, "--model", {MODEL!r}])
print("exit", code)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "exit 2" in done.stdout
    assert "table columns" in done.stdout and "medsam2 cohort lesions.csv --out segs/" in done.stdout
    assert "runs on Ray, which is not installed: pip install 'medsam2[cohort]'" in done.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was written
