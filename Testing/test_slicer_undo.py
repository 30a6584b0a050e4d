"""MedSAM2 writes as steps of the segmentation's undo history, on a slicer-core scene.

The Segment Editor here is Slicer's own ``vtkSlicerSegmentEditorLogic`` (from the slicer-core wheel), set up as
the Segment Editor module sets it up (a ``vtkMRMLSegmentEditorNode``, 10 undo states:
``Modules/Scripted/SegmentEditor/SegmentEditor.py``). Inside Slicer the module reaches the same logic through
the Segment Editor widget's slots ``saveStateForUndo``/``undo``, which call these methods
(``Modules/Loadable/Segmentations/Widgets/qMRMLSegmentEditorWidget.cxx``, Slicer 5.10 and 5.12). An edit "as
the Segment Editor makes it" is what an effect does: save a state, then ``ModifySegmentByLabelmap``
(``qSlicerSegmentEditorAbstractEffect::modifySegmentByLabelmap``).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import slicer
from slicer_scene import OracleEngine, all_segments, assert_same_segments, load_ct, load_segmentation, painted

import medsam2
from MedSAM2SlicerLib import EditorUndo, OwnUndo, SegmentationLogic, scene_nodes
from MedSAM2SlicerLib.geometry import volume_geometry
from MedSAM2SlicerLib.history import UNDO_STATES
from MedSAM2SlicerLib.segments import ensure_converter_rules, oriented_image

BOX_XY = (20, 40, 100, 90)  # over both lungs and the tissue of slice 20
BOX = medsam2.prompts.Prompt(axis=0, index=20, box=BOX_XY)


@pytest.fixture
def scene():
    ensure_converter_rules()
    scene = slicer.vtkMRMLScene()
    scene.RegisterNodeClass(slicer.vtkMRMLSegmentEditorNode())
    return scene


def segment_editor(scene):
    editor = slicer.vtkSlicerSegmentEditorLogic()
    editor.SetMRMLScene(scene)
    editor.SetSegmentEditorNode(scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode"))
    editor.SetMaximumNumberOfUndoStates(UNDO_STATES)
    return editor


def edit_like_an_effect(editor, segmentation, segment_id, volume, index=25):
    """Add a 10 x 10 square on slice ``index`` to the segment, as a Segment Editor effect does."""
    mask = np.zeros(volume.GetImageData().GetDimensions()[::-1], dtype=bool)
    mask[index, 10:20, 10:20] = True
    editor.SaveStateForUndo()
    image = oriented_image(mask, volume_geometry(volume).ijk_to_world)
    editor.ModifySegmentByLabelmap(segmentation, segment_id, image, editor.ModificationModeAdd, False, True)


def logic_with(history):
    return SegmentationLogic(model=SimpleNamespace(name="oracle"), engine=OracleEngine(), history=history)


class SegmentSelectorLike:
    """What ``qMRMLSegmentSelectorWidget`` does when a segment is removed (``populateSegmentCombobox``,
    ``Libs/MRML/Widgets/qMRMLSegmentSelectorWidget.cxx``, Slicer 5.10 and 5.12): if its current segment is
    gone it selects the first remaining one and emits ``currentSegmentChanged``, which the module's
    ``onSegmentChanged`` passes through ``scene_nodes.chosen_segment``."""

    def __init__(self, p) -> None:
        self.p = p
        p.segmentation.AddObserver(slicer.vtkSegmentation.SegmentRemoved, self.on_removed)

    def on_removed(self, caller, event) -> None:
        segmentation = self.p.segmentation.GetSegmentation()
        if segmentation.GetSegment(self.p.segmentID) is None and segmentation.GetNumberOfSegments():
            self.p.segmentID = scene_nodes.chosen_segment(self.p, segmentation.GetNthSegmentID(0))


def test_run_then_an_editor_edit_are_undone_in_order_and_redone(scene):
    volume = load_ct(scene)
    segmentation = load_segmentation(scene)
    editor = segment_editor(scene)
    logic = logic_with(EditorUndo(editor))
    before = all_segments(segmentation, volume)

    new = logic.segment(volume, segmentation, [BOX])
    after_run = all_segments(segmentation, volume)
    np.testing.assert_array_equal(after_run[new], painted((34, 128, 128), 0, 20, BOX_XY))
    # The write pointed the Segment Editor at the segmentation and gave it the volume as source.
    assert editor.GetSegmentationNode() is segmentation and editor.GetSourceVolumeNode() is volume

    edit_like_an_effect(editor, segmentation, new, volume)
    after_edit = all_segments(segmentation, volume)
    assert after_edit[new][25, 10:20, 10:20].all() and not after_run[new][25].any()

    assert logic.undo(segmentation)  # the panel's Undo: the edit first
    assert_same_segments(after_run, all_segments(segmentation, volume))
    assert logic.undo(segmentation)  # then the run: its new segment is gone, the others as before
    assert segmentation.GetSegmentation().GetSegment(new) is None
    assert_same_segments(before, all_segments(segmentation, volume))
    assert not logic.undo(segmentation) and not editor.CanUndo()

    editor.Redo()  # Ctrl+Y in the Segment Editor agrees: the run, then the edit
    assert_same_segments(after_run, all_segments(segmentation, volume))
    editor.Redo()
    assert_same_segments(after_edit, all_segments(segmentation, volume))


def test_ctrl_z_in_the_segment_editor_takes_a_run_back(scene):
    volume = load_ct(scene)
    segmentation = load_segmentation(scene)
    editor = segment_editor(scene)
    tissue = segmentation.GetSegmentation().GetSegmentIdBySegmentName("tissue")
    before = all_segments(segmentation, volume)
    logic_with(EditorUndo(editor)).segment(volume, segmentation, [BOX], segment_id=tissue)
    assert not np.array_equal(all_segments(segmentation, volume)[tissue], before[tissue])
    editor.Undo()
    assert_same_segments(before, all_segments(segmentation, volume))


@pytest.mark.parametrize("history", ["editor", "own"])
def test_undoing_a_created_segment_leaves_none_selected_and_the_next_run_adds_one(scene, history):
    volume = load_ct(scene)
    segmentation = load_segmentation(scene)
    undo = EditorUndo(segment_editor(scene)) if history == "editor" else OwnUndo()
    logic = logic_with(undo)
    p = SimpleNamespace(inputVolume=volume, segmentation=segmentation, segmentID="")
    SegmentSelectorLike(p)
    before = all_segments(segmentation, volume)

    p.segmentID = logic.segment(volume, segmentation, [BOX], p.segmentID or None)
    created = p.segmentID
    assert scene_nodes.undo(p, undo)
    assert segmentation.GetSegmentation().GetSegment(created) is None
    assert p.segmentID == ""  # not the first remaining segment the selector jumped to

    p.segmentID = logic.segment(volume, segmentation, [BOX], p.segmentID or None)
    after = all_segments(segmentation, volume)
    new = after.pop(p.segmentID)
    np.testing.assert_array_equal(new, painted((34, 128, 128), 0, 20, BOX_XY))
    assert_same_segments(before, after)  # every voxel of the seven other segments


@pytest.mark.parametrize("history", ["editor", "own"])
def test_closing_the_scene_empties_the_history(scene, history):
    volume = load_ct(scene)
    segmentation = load_segmentation(scene)
    editor = segment_editor(scene)
    undo = EditorUndo(editor) if history == "editor" else OwnUndo()
    logic_with(undo).segment(volume, segmentation, [BOX])
    assert undo.can_undo(segmentation)
    scene.Clear(0)
    if history == "editor":
        assert not editor.CanUndo()
    else:
        assert undo.history.GetNumberOfStates() == 0 and undo.history.GetSegmentation() is None
    assert not undo.can_undo(segmentation)


def test_own_history_restores_an_existing_segment_and_starts_anew_on_another_segmentation(scene):
    volume = load_ct(scene)
    segmentation = load_segmentation(scene)
    before = all_segments(segmentation, volume)
    tissue = segmentation.GetSegmentation().GetSegmentIdBySegmentName("tissue")
    undo = OwnUndo()
    logic = logic_with(undo)
    prompt = medsam2.prompts.Prompt(axis=1, index=60, box=(10, 5, 50, 25))
    assert logic.segment(volume, segmentation, [prompt], segment_id=tissue) == tissue
    new_id = logic.segment(volume, segmentation, [prompt])
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 8
    assert logic.undo(segmentation) and logic.undo(segmentation) and not logic.undo(segmentation)
    assert_same_segments(before, all_segments(segmentation, volume))
    assert segmentation.GetSegmentation().GetSegment(new_id) is None

    other = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    logic.segment(volume, segmentation, [prompt], segment_id=tissue)
    logic.segment(volume, other, [prompt])
    assert undo.can_undo(other) and not undo.can_undo(segmentation)
    assert undo.history.GetMaximumNumberOfStates() == UNDO_STATES


def test_add_segment_is_an_undo_step_with_a_generated_id_and_a_name(scene):
    volume = load_ct(scene)
    editor = segment_editor(scene)
    undo = EditorUndo(editor)
    p = SimpleNamespace(inputVolume=volume, segmentation=None, segmentID="")
    first = scene_nodes.add_segment(p, undo)
    segmentation = p.segmentation.GetSegmentation()
    assert p.segmentID == first and segmentation.GetSegment(first).GetName() == "MedSAM2"
    assert first != "MedSAM2"  # an ID generated by vtkSegmentation, the name where the name belongs
    second = scene_nodes.add_segment(p, undo)
    assert segmentation.GetSegment(second).GetName() == "MedSAM2 2" and p.segmentID == second
    assert scene_nodes.undo(p, undo)
    assert segmentation.GetNumberOfSegments() == 1 and p.segmentID == ""
    with pytest.raises(ValueError, match="input volume"):
        scene_nodes.add_segment(SimpleNamespace(inputVolume=None, segmentation=None, segmentID=""), undo)
