"""The panel's nodes in the scene, without the engine: prompt markups, added segments, the segment it fills.

Imports only Slicer's MRML (no PyTorch), so the module can use it before the engine's packages are installed.
``p`` is the module's parameter node, or any object with its fields.

- Prompt nodes are made when the user first places a prompt, not when a scene opens: Slicer's markups logic
  makes every markups node added to the scene the Markups toolbar's active node
  (``vtkSlicerMarkupsLogic::OnMRMLSceneNodeAdded``, ``Modules/Loadable/Markups/Logic``).
- An added segment is one undo step, as the Segment Editor's Add (``vtkSlicerSegmentEditorLogic::AddEmptySegment``
  saves a state first).
- When the segment the panel fills disappears (an undo that takes back a segment MedSAM2 created, or a
  deletion), the panel fills none: ``qMRMLSegmentSelectorWidget`` would select the first remaining segment and
  report it like a choice of the user (``populateSegmentCombobox``, ``Libs/MRML/Widgets``), and the next run
  would overwrite that unrelated segment.
"""

from __future__ import annotations

PROMPT_NODES = {  # parameter node field: (MRML class, node name, colour of selected control points)
    "positivePoints": ("vtkMRMLMarkupsFiducialNode", "MedSAM2 positive", (0.2, 0.85, 0.2)),
    "negativePoints": ("vtkMRMLMarkupsFiducialNode", "MedSAM2 negative", (0.95, 0.25, 0.2)),
    "box": ("vtkMRMLMarkupsROINode", "MedSAM2 box", (1.0, 0.85, 0.1)),
}
NEW_SEGMENT_NAME = "MedSAM2"


def prompt_node(p, field: str, scene):
    """The markups node of prompt ``field`` ("positivePoints", "negativePoints", "box"), made if missing."""
    node = getattr(p, field)
    if node is None:
        class_name, name, colour = PROMPT_NODES[field]
        node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))
        node.CreateDefaultDisplayNodes()
        node.GetDisplayNode().SetSelectedColor(*colour)
        setattr(p, field, node)
    return node


def ensure_segmentation(p):
    """The panel's segmentation; a new one on the input volume's grid when there is none."""
    if p.segmentation is None:
        if not p.inputVolume:
            raise ValueError("Select an input volume first")
        scene = p.inputVolume.GetScene()
        segmentation = scene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", f"{p.inputVolume.GetName()} MedSAM2"
        )
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(p.inputVolume)
        p.segmentation = segmentation
    return p.segmentation


def add_segment(p, history) -> str:
    """Add an empty segment (and a segmentation on the input volume if there is none) as one undo step of
    ``history`` (:mod:`MedSAM2SlicerLib.history`); the panel fills it next. Returns its ID."""
    node = ensure_segmentation(p)
    history.save_state(node, p.inputVolume)
    segmentation = node.GetSegmentation()
    # vtkSegmentation::AddEmptySegment(segmentId, segmentName, color): an empty ID is generated.
    segment_id = segmentation.AddEmptySegment("", unused_segment_name(segmentation))
    if not segment_id:
        raise RuntimeError(f"Could not add a segment to '{node.GetName()}'")
    p.segmentID = segment_id
    return segment_id


def chosen_segment(p, segment_id: str) -> str:
    """The segment the panel fills after the segment selector reports ``segment_id``: none ("") when the one
    it filled has just disappeared from its segmentation (see the module notes), else ``segment_id``."""
    if p.segmentID and not has_segment(p.segmentation, p.segmentID):
        return ""
    return segment_id or ""


def undo(p, history) -> bool:
    """The latest step of the panel's segmentation's undo ``history``; a segment it removes is filled no more.

    False when there was nothing to undo."""
    taken_back = p.segmentation is not None and history.undo(p.segmentation)
    forget_missing_segment(p)
    return taken_back


def forget_missing_segment(p) -> None:
    """Fill no segment when the one the panel filled is gone (after an undo)."""
    if p.segmentID and not has_segment(p.segmentation, p.segmentID):
        p.segmentID = ""


def has_segment(segmentation_node, segment_id: str) -> bool:
    return (
        segmentation_node is not None
        and segmentation_node.GetSegmentation().GetSegment(segment_id) is not None
    )


def unused_segment_name(segmentation) -> str:
    """ "MedSAM2", else "MedSAM2 2", "MedSAM2 3", ...: the first name no segment of ``segmentation`` has."""
    names = {segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())}
    name, n = NEW_SEGMENT_NAME, 1
    while name in names:
        n += 1
        name = f"{NEW_SEGMENT_NAME} {n}"
    return name
