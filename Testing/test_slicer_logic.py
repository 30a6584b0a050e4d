"""MedSAM2SlicerLib against a real MRML scene from the slicer-core wheel, with an oracle engine
(``slicer_scene.OracleEngine``: it paints each prompt at its own slice, so any error in geometry, axis choice
or writing shows)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import vtk
from golden import golden_model
from slicer_scene import (
    DATA,
    REFERENCE_GEOMETRY,
    OracleEngine,
    add_points,
    add_transform,
    all_segments,
    assert_same_segments,
    load_ct,
    load_segmentation,
    make_volume,
    new_logic,
    node_to_world,
    numpy_matrix,
    painted,
    replace_segment,
    segment_on_grid,
    world_grid,
    world_of,
)

import medsam2
from medsam2.errors import Cancelled, InputError
from MedSAM2SlicerLib import MaskSegment, SegmentationLogic, read_segment_mask, volume_geometry
from MedSAM2SlicerLib.geometry import VolumeGeometry, volume_array


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


# -- geometry ------------------------------------------------------------------------------------------------


def test_ct_array_and_geometry_match_simpleitk(scene):
    volume = load_ct(scene)
    image = sitk.ReadImage(str(DATA / "CTChest4.nrrd"))
    np.testing.assert_array_equal(volume_array(volume), sitk.GetArrayFromImage(image))
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    expected = np.eye(4)
    expected[:3, :3] = lps_to_ras @ np.reshape(image.GetDirection(), (3, 3)) @ np.diag(image.GetSpacing())
    expected[:3, 3] = lps_to_ras @ np.array(image.GetOrigin())
    geometry = volume_geometry(volume)
    np.testing.assert_allclose(geometry.ijk_to_world, expected, atol=1e-6)
    assert geometry.shape == (34, 128, 128)
    np.testing.assert_allclose(geometry.spacing, image.GetSpacing()[::-1])


def test_closest_axis_for_standard_permuted_and_oblique_grids():
    permuted = np.eye(4)
    permuted[:3, :3] = np.array([[0, 1, 0], [0, 0, 2], [1, 0, 0]])  # i -> S, j -> R, k -> A
    axis = np.array([1.0, 1.0, 1.0]) / np.sqrt(3)
    angle = np.deg2rad(20)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross
    oblique = permuted.copy()
    oblique[:3, :3] = rotation @ permuted[:3, :3]
    for matrix in (permuted, oblique):
        geometry = VolumeGeometry((10, 20, 30), matrix)
        assert [geometry.view_axis(v) for v in ("axial", "coronal", "sagittal")] == [2, 0, 1]
    standard = VolumeGeometry((10, 20, 30), np.diag([0.7, 0.7, 5.0, 1.0]))
    assert [standard.view_axis(v) for v in ("axial", "coronal", "sagittal")] == [0, 1, 2]


# -- prompts and the written segment -------------------------------------------------------------------------

VIEWS = {  # view: (array axis, slice index, box (x0, y0, x1, y1) on that slice)
    "axial": (0, 17, (40, 50, 70, 66)),
    "coronal": (1, 64, (30, 10, 90, 20)),
    "sagittal": (2, 80, (45, 8, 95, 25)),
}


def kji_to_ijk(axis, index, x, y):
    kji = [0.0, 0.0, 0.0]
    rows, columns = (a for a in range(3) if a != axis)
    kji[axis], kji[rows], kji[columns] = index, y, x
    return kji[::-1]


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("name_the_view", [True, False])
def test_markups_in_ras_land_on_the_right_slice_and_voxels(scene, view, name_the_view):
    volume = load_ct(scene)
    axis, index, (x0, y0, x1, y1) = VIEWS[view]
    positives = [(x0 + 3, y0 + 2), (x1 - 1, y1)]
    points = add_points(
        scene,
        volume,
        [kji_to_ijk(axis, index, x, y) for x, y in positives + [(5, 3)]],
        labels=["a", "b", "-background"],
    )
    # An ROI as drawn in that view: thin along the normal, edges 0.4 voxel outside the box's voxel centres.
    low = np.array(kji_to_ijk(axis, index - 0.2, x0 - 0.4, y0 - 0.4))
    high = np.array(kji_to_ijk(axis, index + 0.2, x1 + 0.4, y1 + 0.4))
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    a, b = world_of(volume, *low), world_of(volume, *high)
    roi.SetCenter(*((a + b) / 2))
    roi.SetSize(*np.abs(b - a))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    logic = new_logic()

    prompts = logic.prompts_from_nodes(volume, points, roi, slice_axis=view if name_the_view else None)
    assert len(prompts) == 1
    prompt = prompts[0]
    assert (prompt.axis, prompt.index) == (axis, index)
    np.testing.assert_allclose(prompt.points, positives + [(5, 3)], atol=1e-6)
    assert list(prompt.labels) == [1, 1, 0]
    np.testing.assert_array_equal(prompt.box, (x0, y0, x1, y1))
    # Without points the ROI alone tells the view: it is thinnest along the view's normal.
    (from_roi,) = logic.prompts_from_nodes(volume, roi_node=roi, slice_axis=view if name_the_view else None)
    assert (from_roi.axis, from_roi.index, from_roi.points) == (axis, index, None)
    np.testing.assert_array_equal(from_roi.box, (x0, y0, x1, y1))

    segment_id = logic.segment(volume, segmentation, prompts)
    expected = painted((34, 128, 128), axis, index, (x0, y0, x1, y1))
    np.testing.assert_array_equal(segment_on_grid(segmentation, segment_id, volume), expected)
    assert logic.engine.calls[0].spacing == pytest.approx(volume_geometry(volume).spacing)


def test_points_on_several_slices_are_refused_by_name(scene):
    volume = load_ct(scene)
    points = add_points(scene, volume, [(10, 20, 5), (30, 40, 6)], labels=["liver top", "liver low"])
    with pytest.raises(InputError, match="liver top.*slice 5.*liver low.*slice 6"):
        new_logic().prompts_from_nodes(volume, points, slice_axis="axial")
    with pytest.raises(InputError, match="not on one slice along any axis"):
        new_logic().prompts_from_nodes(volume, points)
    outside = add_points(scene, volume, [(10, 20, 40)], labels=["far"])
    with pytest.raises(InputError, match="'far'.*outside the volume"):
        new_logic().prompts_from_nodes(volume, outside)


def test_negative_points_by_description_and_by_second_node(scene):
    volume = load_ct(scene)
    positive = add_points(scene, volume, [(10, 20, 5), (11, 20, 5)], labels=["p1", "p2"])
    positive.SetNthControlPointDescription(1, "Negative")
    negative = add_points(scene, volume, [(12, 22, 5), (90, 90, 30)], labels=["n", "being placed"])
    negative.UnsetNthControlPointPosition(1)  # not placed yet: ignored
    (prompt,) = new_logic().prompts_from_nodes(volume, positive, negative_points_node=negative, slice_axis=0)
    np.testing.assert_allclose(prompt.points, [(10, 20), (11, 20), (12, 22)], atol=1e-6)
    assert list(prompt.labels) == [1, 0, 0]


def test_mask_segment_prompt_is_resampled_onto_the_volume_grid(scene):
    volume = load_ct(scene)
    reference = load_segmentation(scene)
    lung = reference.GetSegmentation().GetSegmentIdBySegmentName("right lung")
    lung_voxels = segment_on_grid(reference, lung, volume)
    (prompt,) = new_logic().prompts_from_nodes(volume, mask_segment=(reference, lung, 20, "axial"))
    assert (prompt.axis, prompt.index) == (0, 20) and prompt.mask.sum() > 500
    np.testing.assert_array_equal(prompt.mask, lung_voxels[20])

    # Moved one voxel to the right (+R is +i here): the mask must move one column.
    add_transform(scene, [[1, 0, 0, 3.046875953674319], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], reference)
    (shifted,) = new_logic().prompts_from_nodes(volume, mask_segment=MaskSegment(reference, lung, 20, 0))
    np.testing.assert_array_equal(shifted.mask[:, 1:], lung_voxels[20][:, :-1])

    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    logic = new_logic()
    segment_id = logic.segment(volume, segmentation, [prompt])
    expected = np.zeros_like(lung_voxels)
    expected[20] = lung_voxels[20]
    np.testing.assert_array_equal(segment_on_grid(segmentation, segment_id, volume), expected)
    with pytest.raises(InputError, match="empty on slice 0"):
        new_logic().prompts_from_nodes(volume, mask_segment=(reference, lung, 0, "axial"))


def test_segment_lands_on_a_permuted_oblique_volume(scene):
    voxels = volume_array(load_ct(scene))
    matrix = np.eye(4)
    angle = np.deg2rad(25)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    matrix[:3, :3] = rotation @ np.array([[0, 3.0, 0], [0, 0, 10.0], [3.0, 0, 0]])  # i -> S, j -> ~R, k -> ~A
    matrix[:3, 3] = (12.5, -30.0, 7.0)
    volume = make_volume(scene, voxels, matrix, "oblique")
    ijk = [(64, 10, 3), (64, 100, 30), (64, 50, 17)]
    points = add_points(scene, volume, ijk)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    logic = new_logic()
    (prompt,) = logic.prompts_from_nodes(volume, points, slice_axis="axial")
    assert (prompt.axis, prompt.index) == (2, 64)
    segment_id = logic.segment(volume, segmentation, [prompt])
    expected = painted(voxels.shape, 2, 64, points=[(j, k) for _, j, k in ijk])
    np.testing.assert_array_equal(segment_on_grid(segmentation, segment_id, volume), expected)


def test_segment_lands_on_a_volume_under_parent_transforms(scene):
    volume = load_ct(scene)
    turn = [[0, -1, 0, 40.0], [1, 0, 0, -25.0], [0, 0, 1, 15.0], [0, 0, 0, 1]]  # 90 degrees about S: i -> A
    add_transform(scene, turn, volume)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    add_transform(scene, [[1, 0, 0, 7.0], [0, 1, 0, -3.0], [0, 0, 1, 11.0], [0, 0, 0, 1]], segmentation)
    ijk = [(70, 20, 10), (70, 90, 25)]
    points = add_points(scene, volume, ijk)  # placed in world, where the transformed voxels are
    logic = new_logic()
    (prompt,) = logic.prompts_from_nodes(volume, points, slice_axis="coronal")
    assert (prompt.axis, prompt.index) == (2, 70)
    segment_id = logic.segment(volume, segmentation, [prompt])
    expected = painted((34, 128, 128), 2, 70, points=[(j, k) for _, j, k in ijk])
    np.testing.assert_array_equal(segment_on_grid(segmentation, segment_id, volume), expected)
    np.testing.assert_array_equal(
        read_segment_mask(segmentation, segment_id, volume_geometry(volume)), expected
    )
    # The segmentation's reference grid (in its own coordinates) is the volume's grid.
    grid, extent = vtk.vtkMatrix4x4(), [0] * 6
    reference = segmentation.GetSegmentation().GetConversionParameter(REFERENCE_GEOMETRY)
    assert slicer.vtkSegmentationConverter.DeserializeImageGeometry(reference, grid, extent)
    assert extent == [0, 127, 0, 127, 0, 33]
    np.testing.assert_allclose(
        node_to_world(segmentation) @ numpy_matrix(grid), world_grid(volume), atol=1e-6
    )


def test_non_linear_transforms_and_surface_segmentations_are_refused(scene):
    volume = load_ct(scene)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "surfaces")
    segmentation.GetSegmentation().SetSourceRepresentationName("Closed surface")
    prompt = medsam2.prompts.Prompt(axis=0, index=3, box=(1, 1, 9, 9))
    with pytest.raises(InputError, match="'surfaces' is stored as 'Closed surface'.*'Binary labelmap'"):
        new_logic().segment(volume, segmentation, [prompt])
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 0
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    volume.SetAndObserveTransformNodeID(grid.GetID())
    points = add_points(scene, volume, [(10, 20, 5)])
    with pytest.raises(InputError, match="non-linear transform 'warp'.*Harden"):
        new_logic().prompts_from_nodes(volume, points)


def test_other_segments_and_volume_voxels_are_untouched(scene):
    volume = load_ct(scene)
    segmentation = load_segmentation(scene)
    voxels = volume_array(volume)
    before = all_segments(segmentation, volume)
    logic = new_logic(OracleEngine(scribble=True))  # the engine even overwrites its input array
    roi_box = (20, 40, 100, 90)  # overlaps both lungs and the tissue segment on slice 20
    prompt = medsam2.prompts.Prompt(axis=0, index=20, box=roi_box)
    segment_id = logic.segment(volume, segmentation, [prompt])
    after = all_segments(segmentation, volume)
    new = after.pop(segment_id)
    np.testing.assert_array_equal(new, painted(voxels.shape, 0, 20, roi_box))
    assert_same_segments(before, after)
    np.testing.assert_array_equal(volume_array(volume), voxels)


@pytest.mark.parametrize("failure", ["cancelled", "bad result", "write error"])
def test_cancelled_or_failed_run_leaves_segmentations_unchanged(scene, failure, monkeypatch):
    volume = load_ct(scene)
    loaded, empty = load_segmentation(scene), scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    tissue = loaded.GetSegmentation().GetSegmentIdBySegmentName("tissue")
    before = all_segments(loaded, volume)
    geometry_before = loaded.GetSegmentation().GetConversionParameter(REFERENCE_GEOMETRY)
    prompt = medsam2.prompts.Prompt(axis=0, index=10, box=(10, 10, 40, 40))
    logic = new_logic()
    cancel = threading.Event()
    if failure == "cancelled":
        cancel.set()
        error = Cancelled
    elif failure == "bad result":
        logic.engine = lambda *args, **kwargs: SimpleNamespace(labels=np.zeros((3, 3, 3), np.uint8))
        error = RuntimeError
    else:  # fails after the segment was added, before its voxels are written

        def broken(*args):
            raise OSError("disk full")

        monkeypatch.setattr("MedSAM2SlicerLib.segment_writer.oriented_image", broken)
        error = OSError
    for segmentation, segment_id in [(loaded, None), (loaded, tissue), (empty, None), (empty, "new")]:
        with pytest.raises(error):
            logic.segment(volume, segmentation, [prompt], segment_id, cancel=cancel)
    assert_same_segments(before, all_segments(loaded, volume))
    assert loaded.GetSegmentation().GetConversionParameter(REFERENCE_GEOMETRY) == geometry_before
    assert empty.GetSegmentation().GetNumberOfSegments() == 0
    assert empty.GetSegmentation().GetConversionParameter(REFERENCE_GEOMETRY) == ""


def test_correction_re_propagates_only_the_corrected_object(scene):
    volume = load_ct(scene)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    engine = OracleEngine()
    logic = new_logic(engine)
    first = medsam2.prompts.Prompt(axis=0, index=15, box=(30, 30, 60, 60))
    other = medsam2.prompts.Prompt(axis=0, index=15, box=(80, 80, 100, 100))
    a = logic.segment(volume, segmentation, [first])
    b = logic.segment(volume, segmentation, [other])
    b_before = segment_on_grid(segmentation, b, volume)
    with pytest.raises(InputError, match="not been edited"):
        logic.correct(volume, segmentation, a)

    # The user redraws object A on slice 18 (Slicer's own API, as the Segment Editor would).
    edited = segment_on_grid(segmentation, a, volume)
    edited[18, 40:50, 35:45] = True
    geometry = volume_geometry(volume)
    replace_segment(segmentation, a, volume, edited)

    def reaching_further(model, volume, prompts, **kwargs):  # the propagation also finds A on slice 20
        result = engine(model, volume, prompts, **kwargs)
        result.labels[20, 30:61, 30:61] = 1
        return result

    logic.engine = reaching_further
    correction = logic.correct(volume, segmentation, a)
    assert (correction.segment_id, correction.axis, correction.slices) == (a, 0, [18])
    prompts = engine.calls[-1].prompts
    assert len(engine.calls) == 3 and [(p.axis, p.index) for p in prompts] == [(0, 15), (0, 18)]
    np.testing.assert_array_equal(prompts[0].box, first.box)
    np.testing.assert_array_equal(prompts[1].mask, edited[18])
    propagated = edited.copy()
    propagated[20, 30:61, 30:61] = True
    np.testing.assert_array_equal(segment_on_grid(segmentation, a, volume), propagated)
    np.testing.assert_array_equal(segment_on_grid(segmentation, b, volume), b_before)
    assert b_before.sum() == 21 * 21
    # Undoing the correction shows the edit again, and the edit is compared with the run the undo went back
    # to (the one the segment differs from least), so it is found again.
    assert logic.undo(segmentation)
    np.testing.assert_array_equal(segment_on_grid(segmentation, a, volume), edited)
    assert logic.correct(volume, segmentation, a).slices == [18]
    logic.engine = engine

    # Slices can be named, e.g. for a segment drawn by hand, which has no earlier run.
    hand = logic.writer.write(segmentation, edited, geometry, segment_name="hand drawn")
    logic.correct(volume, segmentation, hand, slices=[18], axis="axial")
    assert [(p.axis, p.index) for p in engine.calls[-1].prompts] == [(0, 18)]
    np.testing.assert_array_equal(
        segment_on_grid(segmentation, hand, volume), edited & (np.arange(34) == 18)[:, None, None]
    )

    # Whatever the engine says on a corrected slice, the slice keeps what the user drew.
    logic.engine = lambda model, volume, prompts, **kwargs: SimpleNamespace(
        labels=np.ones(volume.shape, np.uint8)
    )
    logic.correct(volume, segmentation, hand, slices=[18], axis=0)
    expected = np.ones_like(edited)
    expected[18] = edited[18]
    np.testing.assert_array_equal(segment_on_grid(segmentation, hand, volume), expected)


def test_erasing_the_object_on_a_slice_ends_it_there_when_re_propagated(scene):
    """A radiologist erases the object on a slice past its end and re-propagates: the erased slice becomes an
    absent prompt, and the real engine (``medsam2.segment_volume``, a tiny model that finds the object on every
    slice) no longer carries the object across it. The erase is made with Slicer's own
    ``SetBinaryLabelmapToSegment``, where the Segment Editor's erase ends (slicer-core: the MRML logic, not
    the editor's widgets)."""
    volume = load_ct(scene)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    logic = SegmentationLogic(model=golden_model(presence_shift=5.0), engine=medsam2.segment_volume)
    options = {"orientations": 2}
    prompt = medsam2.prompts.Prompt(axis=0, index=15, box=(30, 30, 60, 60))
    a = logic.segment(volume, segmentation, [prompt], options=options)
    first = segment_on_grid(segmentation, a, volume)
    assert first[25:].any() and first[:5].any()  # the model runs on through the volume

    erased = first.copy()
    erased[22] = False
    erased[3] = False
    replace_segment(segmentation, a, volume, erased)
    correction = logic.correct(volume, segmentation, a)
    assert (correction.axis, correction.slices) == (0, [3, 22])
    after = segment_on_grid(segmentation, a, volume)
    assert not after[22:].any() and not after[:4].any()
    assert after[4:22].any(axis=(1, 2)).all()
    assert [(p.index, p.absent) for p in logic._runs[(segmentation.GetID(), a)][-1].prompts] == [
        (15, False),
        (3, True),
        (22, True),
    ]
    # Erasing the prompted slice too leaves nothing to start from: refused, the segment left as it was.
    replace_segment(segmentation, a, volume, after & (np.arange(34) != 15)[:, None, None])
    with pytest.raises(InputError, match="nothing to start from"):
        logic.correct(volume, segmentation, a, slices=[15])


def test_model_is_loaded_once_on_first_use_and_default_engine_is_looked_up(scene, monkeypatch):
    loads = []
    monkeypatch.setattr(
        medsam2,
        "load_model",
        lambda name, device, image_size: loads.append((name, device)) or "MODEL",
        raising=False,
    )
    engine = OracleEngine()
    monkeypatch.setattr(medsam2, "segment_volume", engine, raising=False)
    logic = SegmentationLogic("medsam2-lite", device="cpu")
    assert loads == []
    volume = load_ct(scene)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    prompt = medsam2.prompts.Prompt(axis=0, index=5, box=(1, 1, 9, 9))
    logic.segment(volume, segmentation, [prompt], options={"orientations": 2})
    logic.segment(volume, segmentation, [prompt], threshold=0.5)
    assert loads == [("medsam2-lite", "cpu")]
    assert [c.model for c in engine.calls] == ["MODEL", "MODEL"]
    assert engine.calls[0].options == {
        "orientations": 2,
        "modality": "ct",
    }  # a CT with no display: CT default


def test_threshold_cuts_the_probability_map(scene):
    volume = load_ct(scene)
    ramp = np.broadcast_to(np.linspace(0, 1, 128, dtype=np.float32), (34, 128, 128))

    def engine(model, volume, prompts, **kwargs):
        return SimpleNamespace(labels=np.ones(volume.shape, np.uint8), probabilities={1: ramp})

    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    logic = new_logic(engine)
    prompt = medsam2.prompts.Prompt(axis=0, index=5, points=[(3, 3)])
    segment_id = logic.segment(volume, segmentation, [prompt], threshold=0.75)
    np.testing.assert_array_equal(segment_on_grid(segmentation, segment_id, volume), ramp >= 0.75)


# -- the real engine ----------------------------------------------------------------------------------------


def test_a_real_small_model_runs_end_to_end(scene):
    """The default engine (medsam2.segment_volume) with the tiny golden model, from a segment as mask prompt."""
    from golden import golden_model

    volume = load_ct(scene)
    reference = load_segmentation(scene)
    lung = reference.GetSegmentation().GetSegmentIdBySegmentName("right lung")
    lung_voxels = segment_on_grid(reference, lung, volume)
    voxels = volume_array(volume)
    before = all_segments(reference, volume)
    logic = SegmentationLogic(model=golden_model(presence_shift=5.0))
    prompts = logic.prompts_from_nodes(volume, mask_segment=(reference, lung, 20, "axial"))
    progress = []
    segment_id = logic.segment(
        volume,
        reference,
        prompts,
        options={"orientations": 2, "window": "lung"},
        progress=lambda done, total, message: progress.append(done),
    )
    result = segment_on_grid(reference, segment_id, volume)
    assert result.shape == voxels.shape and result.any()
    prompted = result[20]
    overlap = (prompted & lung_voxels[20]).sum() / (prompted | lung_voxels[20]).sum()
    assert overlap > 0.9  # a mask prompt is the prompted slice's answer
    assert progress and progress[-1] >= 2
    after = all_segments(reference, volume)
    after.pop(segment_id)
    assert_same_segments(before, after)
    np.testing.assert_array_equal(volume_array(volume), voxels)
