"""What the panel leaves in the scene: prompt nodes only once the user places a prompt, and the ROI's axis.

The markups logic here is Slicer's own ``vtkSlicerMarkupsLogic`` from the slicer-core wheel: every markups node
added to the scene becomes the Markups toolbar's active node (``OnMRMLSceneNodeAdded``,
``Modules/Loadable/Markups/Logic/vtkSlicerMarkupsLogic.cxx``). ROIs are placed as in a slice view: two control
points in the view's plane, after which ``vtkMRMLMarkupsROINode::UpdateBoxROIFromControlPoints``
(``Libs/MRML/Core``) makes the box as thick as its shortest in-plane side.
"""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import slicer
import vtk
from slicer_scene import load_ct

from MedSAM2SlicerLib import prompts_from_nodes, scene_nodes, volume_geometry

MODULE_FILE = Path(__file__).resolve().parent.parent / "MedSAM2Slicer" / "MedSAM2Slicer.py"


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def with_markups_logic(scene):
    selection = slicer.vtkMRMLSelectionNode()
    selection.SetSingletonTag("Singleton")
    scene.AddNode(selection)
    logic = slicer.vtkSlicerMarkupsLogic()
    logic.SetMRMLScene(scene)
    return selection, logic


def test_prompt_nodes_are_made_when_a_prompt_is_first_placed(scene):
    selection, _logic = with_markups_logic(scene)
    users = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "the user's landmarks")
    assert selection.GetActivePlaceNodeID() == users.GetID()
    p = SimpleNamespace(positivePoints=None, negativePoints=None, box=None)

    box = scene_nodes.prompt_node(p, "box", scene)  # the user starts placing a box
    assert p.box is box and box.IsA("vtkMRMLMarkupsROINode") and box.GetName() == "MedSAM2 box"
    assert box.GetDisplayNode().GetSelectedColor() == scene_nodes.PROMPT_NODES["box"][2]
    assert selection.GetActivePlaceNodeID() == box.GetID()  # placing into it needs it active
    assert scene_nodes.prompt_node(p, "box", scene) is box
    assert p.positivePoints is None and p.negativePoints is None
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsNode") == 2


def test_opening_a_scene_makes_no_prompt_nodes():
    """The module's paths run when a scene opens or the module is entered make no node; prompt nodes come only
    from ``_startPlacing`` (the place buttons and shortcuts)."""
    tree = ast.parse(MODULE_FILE.read_text())
    methods = {
        f.name: f
        for c in tree.body
        if isinstance(c, ast.ClassDef)
        for f in c.body
        if isinstance(f, ast.FunctionDef)
    }
    scene_open = ("enter", "onSceneEndClose", "initializeParameterNode", "setParameterNode", "_updateGUI")
    for name in scene_open:
        calls = {
            getattr(n.func, "attr", getattr(n.func, "id", ""))
            for n in ast.walk(methods[name])
            if isinstance(n, ast.Call)
        }
        assert not calls & {"AddNewNodeByClass", "AddNode", "prompt_node", "_startPlacing"}, name
    placing = [name for name, f in methods.items() if "prompt_node" in ast.unparse(f)]
    assert placing == ["_startPlacing"]


def roi_drawn_in(scene, volume, axis, corner_a, corner_b):
    """An ROI placed with two clicks on slice 17 of ``axis``; corners are (x, y) of that slice's image."""
    geometry = volume_geometry(volume)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    for x, y in (corner_a, corner_b):
        kji = [0.0, 0.0, 0.0]
        rows, columns = (a for a in range(3) if a != axis)
        kji[axis], kji[rows], kji[columns] = 17.0, y, x
        roi.AddControlPoint(vtk.vtkVector3d(*geometry.kji_to_world([kji])[0]))
    return roi


def test_roi_axis_comes_from_the_view_and_without_one_from_the_thinnest_side_in_mm(scene):
    volume = load_ct(scene)  # voxels 3.05 x 3.05 x 10 mm; array axis 0 is axial, 1 coronal, 2 sagittal
    axial = roi_drawn_in(scene, volume, 0, (40, 50), (70, 66))  # 91 x 49 mm: padded to 49 mm thick
    assert np.allclose(
        axial.GetSize(), (30 * 3.046875953674319, 16 * 3.046875953674319, 16 * 3.046875953674319)
    )
    for slice_axis in ("axial", None):  # thinnest in mm: the normal, tied with the 49 mm side; axial first
        (prompt,) = prompts_from_nodes(volume, roi_node=axial, slice_axis=slice_axis)
        assert (prompt.axis, prompt.index) == (0, 17)
        np.testing.assert_array_equal(prompt.box, (40, 50, 70, 66))

    # Drawn in the coronal view over 4 slices (40 mm) and 60 columns (183 mm): 40 mm thick along A, as
    # thin as along S. Only the view tells them apart; without it the axial axis wins, as documented.
    coronal = roi_drawn_in(scene, volume, 1, (30, 10), (90, 14))
    (prompt,) = prompts_from_nodes(volume, roi_node=coronal, slice_axis="coronal")
    assert (prompt.axis, prompt.index) == (1, 17)
    np.testing.assert_array_equal(prompt.box, (30, 10, 90, 14))
    (guess,) = prompts_from_nodes(volume, roi_node=coronal)
    assert guess.axis == 0

    # 12 columns by 12 slices: in voxels every side is 12 long and the axial axis would win; in mm the box is
    # 120 mm high and thinnest (37 mm) along its normal A, tied with R: coronal comes before sagittal.
    tall = roi_drawn_in(scene, volume, 1, (30, 8), (42, 20))
    (prompt,) = prompts_from_nodes(volume, roi_node=tall)
    assert (prompt.axis, prompt.index) == (1, 17)
