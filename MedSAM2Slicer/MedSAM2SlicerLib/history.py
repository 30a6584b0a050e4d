"""Undo for MedSAM2's writes, as steps of the segmentation's own undo history.

Slicer's Segment Editor keeps the undo history of the segmentation it edits in a ``vtkSegmentationHistory``
(``Libs/vtkSegmentationCore/vtkSegmentationHistory.cxx``) held by its ``vtkSlicerSegmentEditorLogic``
(``Modules/Loadable/Segmentations/Logic/vtkSlicerSegmentEditorLogic.cxx``, Slicer 5.10 and later). Every edit
saves a state first (``SaveStateForUndo``); ``Undo`` restores the previous state of all segments: segments
added since are removed, removed ones come back. MRML scene undo is no help: it is off in Slicer, and nodes have
``UndoEnabled`` false.

So a MedSAM2 write saves a state in that same history before it changes anything:

- :class:`EditorUndo` uses a Segment Editor: Ctrl+Z in the Segment Editor takes a MedSAM2 write back, the
  panel's Undo is that same undo, and edits made in the Segment Editor after a run are undone first. Before a
  write the editor is pointed at the written segmentation (clearing its history of another segmentation, as
  choosing it in the Segment Editor does).
- :class:`OwnUndo` keeps a ``vtkSegmentationHistory`` of its own, for scripts without a Segment Editor.

Memory: the first state copies every representation of the segmentation; each later state shares what has
not changed since the state before (``vtkSegmentation::CopySegment`` with a baseline) and deep-copies the rest.
A MedSAM2 write changes one binary labelmap layer (and the closed surfaces made from it, if shown in 3D). So
with :data:`UNDO_STATES` = 10 (the Segment Editor module's own setting,
``Modules/Scripted/SegmentEditor/SegmentEditor.py``) the history holds one copy of the segmentation plus at most
9 copies of a written layer: a layer is one byte per voxel of the segmentation's grid (the volume's, unless
oversampled), over the extent its segments cover. Both histories are emptied when the scene closes.
"""

from __future__ import annotations

import weakref

import slicer

UNDO_STATES = 10


class _ClearedOnSceneClose:
    """Empties the history when the scene of a segmentation it has seen closes.

    Neither side keeps the other alive: the scene's observer holds the history weakly, the history holds
    the scene weakly (a Python cycle through a VTK observer crashes VTK when the garbage collector breaks it).
    """

    def __init__(self) -> None:
        self._scenes: list[tuple[weakref.ref, int]] = []

    def _watch_scene(self, segmentation_node) -> None:
        scene = segmentation_node.GetScene()
        if scene is None or any(ref() is scene for ref, _tag in self._scenes):
            return
        clear = weakref.WeakMethod(self.clear)

        def on_close(caller, event) -> None:
            if clear() is not None:
                clear()()

        self._scenes.append(
            (weakref.ref(scene), scene.AddObserver(slicer.vtkMRMLScene.EndCloseEvent, on_close))
        )

    def forget_scenes(self) -> None:
        """Stop watching the scenes (when the owner goes away)."""
        for ref, tag in self._scenes:
            scene = ref()
            if scene is not None:
                scene.RemoveObserver(tag)
        self._scenes = []

    def clear(self) -> None:  # each history empties itself its own way
        raise NotImplementedError


class EditorUndo(_ClearedOnSceneClose):
    """Undo through a Segment Editor.

    ``editor`` has the methods of ``vtkSlicerSegmentEditorLogic`` used here: ``GetSegmentationNode``,
    ``SetSegmentationNode``, ``GetSourceVolumeNode``, ``SetSourceVolumeNode``, ``SaveStateForUndo``,
    ``CanUndo``, ``Undo`` and ``ClearUndoState``. Inside Slicer the module passes the Segment Editor module's
    widget through a thin adapter (its slots call these same logic methods).
    """

    def __init__(self, editor) -> None:
        super().__init__()
        self.editor = editor

    def save_state(self, segmentation_node, volume_node=None) -> None:
        """Save the segmentation's state as an undo step, before MedSAM2 writes into it."""
        self._watch_scene(segmentation_node)
        if self.editor.GetSegmentationNode() is not segmentation_node:
            self.editor.SetSegmentationNode(segmentation_node)
        if volume_node is not None and self.editor.GetSourceVolumeNode() is None:
            self.editor.SetSourceVolumeNode(volume_node)
        self.editor.SaveStateForUndo()

    def can_undo(self, segmentation_node) -> bool:
        return self.editor.GetSegmentationNode() is segmentation_node and bool(self.editor.CanUndo())

    def undo(self, segmentation_node) -> bool:
        """Undo the latest step of ``segmentation_node``'s history; False when there is none."""
        if not self.can_undo(segmentation_node):
            return False
        self.editor.Undo()
        return True

    def clear(self) -> None:
        self.editor.ClearUndoState()


class OwnUndo(_ClearedOnSceneClose):
    """A ``vtkSegmentationHistory`` of the segmentation written last (writing into another one starts anew)."""

    def __init__(self, maximum_states: int = UNDO_STATES) -> None:
        super().__init__()
        self.history = slicer.vtkSegmentationHistory()
        self.history.SetMaximumNumberOfStates(maximum_states)
        self._node = None

    def save_state(self, segmentation_node, volume_node=None) -> None:
        self._watch_scene(segmentation_node)
        if self._node is not segmentation_node:
            self._node = segmentation_node
            self.history.SetSegmentation(segmentation_node.GetSegmentation())
        self.history.SaveState()

    def can_undo(self, segmentation_node) -> bool:
        return self._node is segmentation_node and bool(self.history.IsRestorePreviousStateAvailable())

    def undo(self, segmentation_node) -> bool:
        if not self.can_undo(segmentation_node):
            return False
        # As vtkSlicerSegmentEditorLogic::Undo: the restore is one Modified of the node.
        was_modifying = segmentation_node.StartModify()
        try:
            self.history.RestorePreviousState()
        finally:
            segmentation_node.EndModify(was_modifying)
        return True

    def clear(self) -> None:
        self.history.SetSegmentation(None)  # also removes every state
        self._node = None
