"""MedSAM2: prompt one slice, segment the structure through the whole volume (3D Slicer module).

A thin front end in the shape of Slicer's scripted-module template: the panel is ``Resources/UI/MedSAM2Slicer.ui``,
its settings live in a parameter node, and ``MedSAM2SlicerLib`` does the work (prompts from markups, the
segment written as a step of the Segment Editor's undo history). The engine never runs in the Slicer process:
a QTimer polls a run on an engine server, which Slicer starts as its child process (or which runs on another
computer), because PythonQt keeps Python's GIL on the GUI thread and a worker thread here would crawl. Nothing
heavy is imported when Slicer loads the module: PyTorch and the engine are imported on first use, after
``dependencies.ensure`` installed what is missing.

Supported: Slicer 5.10 and later (Python 3.12), built with Qt 5 or Qt 6. This file still loads in older
Slicers (Python 3.9) so as to say so, instead of failing in the middle of a run: keep it free of syntax and
run-time annotations newer than Python 3.9 (CI checks it).
"""

# No ``from __future__ import annotations`` here: parameterNodeWrapper reads the field annotations as types.
import contextlib
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import ctk
import qt
import slicer
import vtk
from slicer import (
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLMarkupsROINode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

DEFAULT_MODEL = "medsam2-lite"
LOCAL_FILE = "<local file>"  # the model combo's entry for a checkpoint chosen on disk
DEVICES = ["auto", "cuda", "cpu", "mps"]
LOCAL_ENGINE, REMOTE_ENGINE = "this computer", "server"
PROPOSED_MODEL_SETTING = "MedSAM2/proposedModel"  # the model proposed once for this computer
POLL_INTERVAL_MS = 100
# Segment Editor takes single letters, digits and Ctrl+Z/Ctrl+Y; Slicer's menus take Ctrl+<letter> (Ctrl+S
# saves). Ctrl+Shift+<letter> is free in both; S is avoided because Ctrl+Shift+S means "save as" on many
# platforms.
SHORTCUTS = {
    "Ctrl+Shift+P": "onPlacePositive",
    "Ctrl+Shift+N": "onPlaceNegative",
    "Ctrl+Shift+B": "onPlaceBox",
    "Ctrl+Shift+M": "onMaskFromSlice",
    "Ctrl+Shift+G": "onApplyButton",
    "Ctrl+Shift+R": "onPropagateCorrections",
}
# MedSAM2SlicerLib.window.WINDOW_CHOICES, here without importing the engine.
WINDOW_CHOICES = ["view", "auto", "abdomen", "lung", "bone", "brain", "mediastinum", "custom"]
MINIMUM_SLICER = (5, 10)
MINIMUM_PYTHON = (3, 12)


def unsupportedSlicerMessage(slicerVersion, pythonVersion) -> str:
    """Why this Slicer cannot run the module ("" when it can): ``(major, minor)`` of Slicer and Python."""
    if tuple(slicerVersion) >= MINIMUM_SLICER and tuple(pythonVersion) >= MINIMUM_PYTHON:
        return ""
    return (
        "MedSAM2 needs 3D Slicer {}.{} or later (Python {}.{}); this is Slicer {}.{} with Python {}.{}. "
        "Install a current Slicer from download.slicer.org and add the MedSAM2 extension there."
    ).format(*MINIMUM_SLICER, *MINIMUM_PYTHON, *slicerVersion, *pythonVersion)


def _unsupported() -> str:
    return unsupportedSlicerMessage((slicer.app.majorVersion, slicer.app.minorVersion), sys.version_info[:2])


class MedSAM2Slicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedSAM2")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedSAM2Slicer developers"]
        self.parent.helpText = _(
            "Segment a structure through a whole volume from a prompt on one slice, with a SAM 2 model and "
            "MedSAM-2's self-sorting memory bank.<br><br>"
            "<b>Workflow</b>: choose the input volume and the segment to fill (<i>Add segment</i> for a new "
            "structure; the selected segment's voxels are replaced, no other segment changes); in any slice "
            "view place positive points inside the structure, negative points outside, a box around it, or "
            "draw it on one slice with the Segment Editor and press <i>Use segment on this slice</i>; press "
            "<b>Segment</b>. Fix a few slices with the Segment Editor and press <b>Propagate corrections</b>; "
            "erase the structure on a slice where it has ended, and it is not carried across that slice. "
            "<b>Undo</b> is the Segment Editor's undo: it takes back the last result or the edits made after "
            "it, in order.<br><br>"
            "<b>Window</b>: by default the model sees a CT as the slice views show it (its window/level); "
            "<i>Window</i> shows what it gets and can choose a preset, a level and width, or <i>auto</i> (the "
            "engine's own rule).<br><br>"
            "<b>Shortcuts</b> (while this module is shown): Ctrl+Shift+P positive point, Ctrl+Shift+N negative "
            "point, Ctrl+Shift+B box, Ctrl+Shift+M segment on the slice under the mouse as mask, "
            "Ctrl+Shift+G segment (again: cancel), Ctrl+Shift+R propagate corrections.<br><br>"
            "The offline default model medsam2-lite needs no download; other checkpoints (SAM 2, SAM 2.1, "
            "MedSAM2) are downloaded into the models folder on first use. A GPU is much faster than the CPU."
        )
        self.parent.acknowledgementText = _(
            'Method: Zhu J., Hamdi A., Qi Y., Jin Y., Wu J. "Medical SAM 2: Segment medical images as video '
            'via Segment Anything Model 2", arXiv:2408.00874, 2024. Built on SAM 2: Ravi N. et al. "SAM 2: '
            'Segment Anything in Images and Videos", arXiv:2408.00714, 2024, and on LiteMedSAM (Ma J. et '
            "al., bowang-lab). Module layout after Slicer's scripted-module template and A. Lasso's "
            "SlicerMONAIAuto3DSeg."
        )
        problem = _unsupported()
        if problem:  # said at load, in the log, the module's help and a message once the application runs
            logging.error(problem)
            self.parent.helpText = problem
            qt.QTimer.singleShot(0, lambda: slicer.util.warningDisplay(problem, windowTitle="MedSAM2"))


@parameterNodeWrapper
class MedSAM2SlicerParameterNode:
    """What the panel shows. ``promptViewNodeID`` is the slice view the points/box were placed in; the mask
    prompt is the segment ``maskSegmentID`` on slice ``maskSlice`` along array axis ``maskAxis`` (-1: none).
    ``windowSource`` is "view" (the display window on CT), "auto" (the engine's rule), a preset name, or
    "custom" (``windowLevel``, ``windowWidth``). The prompt nodes are made on first placement.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    segmentID: str = ""
    positivePoints: vtkMRMLMarkupsFiducialNode
    negativePoints: vtkMRMLMarkupsFiducialNode
    box: vtkMRMLMarkupsROINode
    promptViewNodeID: str = ""
    maskSegmentID: str = ""
    maskAxis: int = 0
    maskSlice: int = -1
    modelName: str = DEFAULT_MODEL
    modelPath: str = ""
    modelImageSize: str = ""
    device: Annotated[str, Choice(DEVICES)] = "auto"
    orientations: Annotated[int, Choice([6, 2, 1])] = 6
    aggregation: Annotated[str, Choice(["confidence", "mean", "majority"])] = "confidence"
    memoryPolicy: Annotated[str, Choice(["self-sorting", "recent"])] = "self-sorting"
    confidenceThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    engine: Annotated[str, Choice(["this computer", "server"])] = (
        "this computer"  # LOCAL_ENGINE, REMOTE_ENGINE
    )
    serverUrl: str = ""
    windowSource: Annotated[str, Choice(WINDOW_CHOICES)] = "view"
    windowLevel: float = 40.0
    windowWidth: Annotated[float, WithinRange(1.0, 100000.0)] = 400.0


@dataclass
class Run:
    """A run in flight on the engine server (``job``, a ``ServerRun``): ``kind`` is "segment" or "correct"."""

    kind: str
    request: object
    job: object
    started: float


class MedSAM2SlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._lastSliceNodeID = ""
        self._promptNodesObserved = []
        self._displayObserved = None  # the input volume's display node: its window is what the model gets
        self._shortcuts = []
        self._cpuNoteShown = False
        self._localFileStatus = ((None, None), "")  # ((path, image size), status line) of a local file
        self._downloadsConfirmed = set()  # registry models the user agreed to download in this session
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.timeout.connect(self._poll)

    @property
    def busy(self) -> bool:
        return self._run is not None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        problem = _unsupported()
        if problem:  # nothing of the panel would work: say why instead
            label = qt.QLabel(problem)
            label.wordWrap = True
            self.layout.addWidget(label)
            self.layout.addStretch(1)
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedSAM2Slicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedSAM2SlicerLogic()

        for widget, single in (
            (self.ui.positivePointsPlaceWidget, False),
            (self.ui.negativePointsPlaceWidget, False),
            (self.ui.boxPlaceWidget, True),
        ):
            widget.buttonsVisible = False
            widget.placeButton().show()
            widget.deleteButton().show()
            widget.placeMultipleMarkups = (
                slicer.qSlicerMarkupsPlaceWidget.ForcePlaceSingleMarkup
                if single
                else slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
            )
        self.ui.boxPlaceWidget.placeButton().toggled.connect(self.onBoxPlaceToggled)
        self.ui.positivePointsButton.clicked.connect(self.onPlacePositive)
        self.ui.negativePointsButton.clicked.connect(self.onPlaceNegative)
        self.ui.boxButton.clicked.connect(self.onPlaceBox)
        self.ui.modelPathLineEdit.filters = ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Readable
        self.ui.downloadProgressBar.hide()
        self._fillModelList()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        crosshair = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        if crosshair is not None:
            self.addObserver(
                crosshair, slicer.vtkMRMLCrosshairNode.CursorPositionModifiedEvent, self._trackView
            )
        self.ui.segmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        self.ui.segmentSelector.connect("currentSegmentChanged(QString)", self.onSegmentChanged)
        self.ui.modelComboBox.currentIndexChanged.connect(self.onModelChanged)
        self.ui.modelPathLineEdit.currentPathChanged.connect(self.onModelPathChanged)
        self.ui.addSegmentButton.clicked.connect(self.onAddSegment)
        self.ui.showModelsFolderButton.clicked.connect(self.onShowModelsFolder)
        self.ui.maskFromSliceButton.clicked.connect(self.onMaskFromSlice)
        self.ui.clearPromptsButton.clicked.connect(self.onClearPrompts)
        self.ui.applyButton.clicked.connect(self.onApplyButton)
        self.ui.propagateCorrectionsButton.clicked.connect(self.onPropagateCorrections)
        self.ui.undoButton.clicked.connect(self.onUndo)
        self.ui.testConnectionButton.clicked.connect(self.onTestConnection)
        self._addShortcuts()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        self._promptNodesObserved, self._displayObserved = [], None
        if self.logic is not None:
            self.logic.forgetHistory()
        self._timer.stop()
        for shortcut in self._shortcuts:
            shortcut.setParent(None)
        self._shortcuts = []
        if self._run is not None:
            self._run.job.cancel()
            self._run = None
        self.logic.shutdownEngine()

    def enter(self) -> None:
        if self.logic is None:  # unsupported Slicer
            return
        self.initializeParameterNode()
        for shortcut in self._shortcuts:
            shortcut.setEnabled(True)

    def exit(self) -> None:
        for shortcut in self._shortcuts:
            shortcut.setEnabled(False)

    def onSceneStartClose(self, caller, event) -> None:
        if self._run is not None:  # its nodes are about to go
            self._run.job.cancel()
            self._endRun(_("The run was stopped: the scene was closed."))
        self.setParameterNode(None)
        self._observePromptNodes([])
        self._observeDisplay(None)
        self.logic.clearHistory()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node ---------------------------------------------------------------------------------------

    def initializeParameterNode(self) -> None:
        parameterNode = self.logic.getParameterNode()
        if not parameterNode.inputVolume:
            parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        self.setParameterNode(parameterNode)

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)
        self._parameterNode = parameterNode
        if parameterNode:
            self._parameterNodeGuiTag = parameterNode.connectGui(self.ui)
            self.addObserver(parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)
            self._updateGUI()

    def _updateGUI(self, caller=None, event=None) -> None:
        """Widgets without an automatic parameter connection, and which buttons can be used now."""
        p = self._parameterNode
        if p is None:
            return
        with signalsBlocked(self.ui.segmentSelector, self.ui.modelComboBox, self.ui.modelPathLineEdit):
            self.ui.segmentSelector.setCurrentNode(p.segmentation)
            self.ui.segmentSelector.setCurrentSegmentID(p.segmentID)
            index = self.ui.modelComboBox.findData(p.modelName)
            if index < 0:  # a registry name not listed yet (packages not installed): show it anyway
                self.ui.modelComboBox.insertItem(0, p.modelName, p.modelName)
                index = 0
            self.ui.modelComboBox.currentIndex = index
            self.ui.modelPathLineEdit.currentPath = p.modelPath
        for field, placeWidget, startButton in self._promptWidgets():
            node = getattr(p, field)
            placeWidget.setCurrentNode(node)
            placeWidget.visible = node is not None
            startButton.visible = node is None
        self._observePromptNodes([p.positivePoints, p.negativePoints, p.box])
        self._observeDisplay(p.inputVolume.GetDisplayNode() if p.inputVolume else None)
        self.ui.windowCustomWidget.visible = p.windowSource == "custom"
        localFile = p.modelName == LOCAL_FILE
        for widget in (
            self.ui.modelPathLabel,
            self.ui.modelPathLineEdit,
            self.ui.modelImageSizeLabel,
            self.ui.modelImageSizeLineEdit,
        ):
            widget.visible = localFile
        remote = p.engine == REMOTE_ENGINE
        for widget in (
            self.ui.serverUrlLabel,
            self.ui.serverUrlLineEdit,
            self.ui.serverTokenLabel,
            self.ui.serverTokenLineEdit,
        ):
            widget.visible = remote
        self.ui.engineStatusLabel.text = self.logic.engineDescription(p)
        self.ui.modelStatusLabel.text = self._modelStatus(p)
        if model_choice().engine_importable():  # no mask prompt can be set before
            self.ui.maskPromptLabel.text = panel().mask_description(p)
            self._showWindow()

        running = self._run is not None
        self.ui.applyButton.text = _("Cancel") if running else _("Segment")
        self.ui.applyButton.enabled = running or bool(p.inputVolume)
        self.ui.propagateCorrectionsButton.enabled = not running and bool(
            p.inputVolume and p.segmentation and p.segmentID
        )
        # Segment Editor edits change what can be undone without telling the panel: Undo says when nothing is left.
        self.ui.undoButton.enabled = not running and bool(p.segmentation)
        for widget in (
            self.ui.inputsCollapsibleButton,
            self.ui.promptsCollapsibleButton,
            self.ui.modelCollapsibleButton,
            self.ui.engineCollapsibleButton,
            self.ui.optionsCollapsibleButton,
        ):
            widget.enabled = not running

    def _observeDisplay(self, displayNode) -> None:
        if displayNode is self._displayObserved:
            return
        if self._displayObserved is not None:
            self.removeObserver(self._displayObserved, vtk.vtkCommand.ModifiedEvent, self._showWindow)
        if displayNode is not None:
            self.addObserver(displayNode, vtk.vtkCommand.ModifiedEvent, self._showWindow)
        self._displayObserved = displayNode

    def _showWindow(self, caller=None, event=None) -> None:
        """What the model will get of the input volume (follows the window/level of the slice views)."""
        if self._parameterNode is None or not model_choice().engine_importable():
            return
        try:
            self.ui.windowDescriptionLabel.text = panel().window_description(self._parameterNode)
        except Exception as error:  # e.g. a volume without voxels: the run will say so
            self.ui.windowDescriptionLabel.text = str(error)

    # -- inputs, model ----------------------------------------------------------------------------------------

    def onSegmentationChanged(self, node) -> None:
        if self._parameterNode:
            self._parameterNode.segmentation = node
            scene_nodes().forget_missing_segment(self._parameterNode)

    def onSegmentChanged(self, segmentID) -> None:
        if self._parameterNode:
            self._parameterNode.segmentID = scene_nodes().chosen_segment(self._parameterNode, segmentID)

    def onAddSegment(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot add a segment."), waitCursor=True):
            scene_nodes().add_segment(self._parameterNode, self.logic.history)

    def onModelChanged(self, index) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.modelName = self.ui.modelComboBox.itemData(index)

    def onModelPathChanged(self, path) -> None:
        if self._parameterNode:
            self._parameterNode.modelPath = path

    def onShowModelsFolder(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot open the models folder."), waitCursor=True):
            folder = model_choice().models_folder()
            folder.mkdir(parents=True, exist_ok=True)
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    def _fillModelList(self) -> None:
        """Registry models (once the engine's packages are installed) and the local-file entry."""
        combo = self.ui.modelComboBox
        with signalsBlocked(combo):
            combo.clear()
            for name, label in model_choice().choices():
                combo.addItem(label, name)
            combo.addItem(_("Local file..."), LOCAL_FILE)
        self._updateGUI()

    def _modelStatus(self, p) -> str:
        """The model's status line; for a local file, computed when the file or its image size changes (the
        file is recognised by its sha256, which takes about a second per 150 MB)."""
        if p.modelName != LOCAL_FILE:
            return model_choice().status(p.modelName, p.modelPath)
        key = (p.modelPath, p.modelImageSize)
        if self._localFileStatus[0] != key:
            try:
                size = model_choice().parse_image_size(p.modelImageSize)
                text = model_choice().local_file_status(p.modelPath, size)
            except ValueError as error:
                text = str(error)
            self._localFileStatus = (key, text)
        return self._localFileStatus[1]

    def _ensureDependencies(self) -> None:
        """Install what is missing (asks first), propose the model for this computer once, then warn once when
        no GPU is there (GUI thread)."""
        from MedSAM2SlicerLib import dependencies

        missing = dependencies.missing_requirements() or not dependencies.torch_available()
        torch = dependencies.ensure()
        if missing:
            self._fillModelList()
        self._proposeModel(torch)
        note = dependencies.device_note(torch, self._parameterNode.device)
        if note and not self._cpuNoteShown:
            self._cpuNoteShown = True
            logging.warning(note)
            slicer.util.showStatusMessage(note, 10000)
            self.ui.statusLabel.text = note

    def _proposeModel(self, torch) -> None:
        """Once per Slicer installation: with a CUDA GPU on this computer, offer MedSAM2's recommended model
        (its size and licence shown) instead of the offline default; without one, keep the default."""
        p = self._parameterNode
        settings = qt.QSettings()
        if p.engine != LOCAL_ENGINE or p.modelName != DEFAULT_MODEL or settings.value(PROPOSED_MODEL_SETTING):
            return
        proposed = model_choice().proposed_model(bool(torch.cuda.is_available()))
        settings.setValue(PROPOSED_MODEL_SETTING, proposed)
        if proposed == DEFAULT_MODEL:
            return
        question = _(
            "A CUDA GPU is available. Use {name}, MedSAM2's recommended model, instead of the offline default "
            "{default}?\n\n{details}"
        ).format(
            name=proposed, default=DEFAULT_MODEL, details=model_choice().download_question(proposed) or ""
        )
        if slicer.util.confirmYesNoDisplay(question, windowTitle=_("MedSAM2 model")):
            p.modelName = proposed
            self._downloadsConfirmed.add(proposed)

    def _confirmDownload(self) -> bool:
        """Ask once before a model is downloaded, showing its size, licence and source; True to go on. A
        remote server downloads what its clients ask for, as its administrator set it up."""
        p = self._parameterNode
        question = model_choice().download_question(p.modelName)
        if p.engine != LOCAL_ENGINE or question is None or p.modelName in self._downloadsConfirmed:
            return True
        if not slicer.util.confirmOkCancelDisplay(question, windowTitle=_("Download a model")):
            self.ui.statusLabel.text = _("Not started: the model was not downloaded.")
            return False
        self._downloadsConfirmed.add(p.modelName)
        return True

    # -- prompts -----------------------------------------------------------------------------------------------

    def _trackView(self, crosshair, event) -> None:
        sliceNode = crosshair.GetCursorPositionXYZ([0.0, 0.0, 0.0])
        if sliceNode is not None:
            self._lastSliceNodeID = sliceNode.GetID()

    def _onPromptPlaced(self, caller, event) -> None:
        if self._parameterNode and self._lastSliceNodeID:
            self._parameterNode.promptViewNodeID = self._lastSliceNodeID

    def _promptWidgets(self):
        """(parameter field, place widget, button that makes the node and starts placing) per prompt."""
        return (
            ("positivePoints", self.ui.positivePointsPlaceWidget, self.ui.positivePointsButton),
            ("negativePoints", self.ui.negativePointsPlaceWidget, self.ui.negativePointsButton),
            ("box", self.ui.boxPlaceWidget, self.ui.boxButton),
        )

    def _observePromptNodes(self, nodes) -> None:
        """Observe exactly ``nodes`` (None entries skipped): observations of nodes no longer used end, so a
        removed node is not kept alive and observations do not pile up."""
        event = slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent
        wanted = [node for node in nodes if node is not None]
        for node in self._promptNodesObserved:
            if not any(node is other for other in wanted):
                self.removeObserver(node, event, self._onPromptPlaced)
        for node in wanted:
            if not self.hasObserver(node, event, self._onPromptPlaced):
                self.addObserver(node, event, self._onPromptPlaced)
        self._promptNodesObserved = wanted

    def _startPlacing(self, field: str) -> None:
        """Make the prompt node on first use (it then becomes the Markups toolbar's active node) and place."""
        if self._parameterNode is None:
            return
        node = scene_nodes().prompt_node(self._parameterNode, field, slicer.mrmlScene)
        for name, placeWidget, _startButton in self._promptWidgets():
            if name == field:
                placeWidget.setCurrentNode(node)
                placeWidget.setPlaceModeEnabled(True)

    def onPlacePositive(self) -> None:
        self._startPlacing("positivePoints")

    def onPlaceNegative(self) -> None:
        self._startPlacing("negativePoints")

    def onPlaceBox(self) -> None:
        self._startPlacing("box")

    def onBoxPlaceToggled(self, placing) -> None:
        # An ROI node holds one box: a new box replaces the old one.
        box = self._parameterNode.box if self._parameterNode else None
        if placing and box is not None and box.GetNumberOfControlPoints():
            box.RemoveAllControlPoints()

    def onMaskFromSlice(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot use the segment as mask prompt."), waitCursor=True):
            self._ensureDependencies()
            sliceNodeID = self._lastSliceNodeID or "vtkMRMLSliceNodeRed"
            panel().set_mask_prompt(self._parameterNode, slicer.mrmlScene.GetNodeByID(sliceNodeID))
            self.ui.statusLabel.text = _("Mask prompt: {what}").format(
                what=panel().mask_description(self._parameterNode)
            )

    def onClearPrompts(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot clear the prompts."), waitCursor=True):
            self.logic.clearPrompts(self._parameterNode)

    # -- running ------------------------------------------------------------------------------------------------

    def onApplyButton(self) -> None:
        if self._run is not None:
            self._cancel()
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot start the segmentation."), waitCursor=True):
            self._ensureDependencies()
            self.logic.useEngine(self._parameterNode, self.ui.serverTokenLineEdit.text)
            if not self._confirmDownload():
                return
            self._start(self.logic.startSegmentation(self._parameterNode), _("Segmenting"))

    def onPropagateCorrections(self) -> None:
        if self._run is not None:
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot propagate the corrections."), waitCursor=True):
            self._ensureDependencies()
            self.logic.useEngine(self._parameterNode, self.ui.serverTokenLineEdit.text)
            if not self._confirmDownload():
                return
            self._start(self.logic.startCorrection(self._parameterNode), _("Propagating corrections"))

    def onTestConnection(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot reach the engine."), waitCursor=True):
            self._ensureDependencies()
            self.logic.useEngine(self._parameterNode, self.ui.serverTokenLineEdit.text)
            self.ui.engineStatusLabel.text = self.logic.testConnection()

    def onUndo(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot undo."), waitCursor=True):
            taken_back = self.logic.undo(self._parameterNode)
            self.ui.statusLabel.text = _("Last step taken back.") if taken_back else _("Nothing to undo.")
            self._updateGUI()

    def _start(self, run, what: str) -> None:
        self._run = run
        self.ui.progressBar.setRange(0, 0)  # busy until the first progress report
        self.ui.statusLabel.text = _("{what}: {status}...").format(what=what, status=run.job.status.message)
        self._timer.start()
        self._updateGUI()

    def _cancel(self) -> None:
        """Give the panel back at once: the engine is asked to stop, and its answer is not awaited."""
        self._run.job.cancel()
        self._endRun(_("Cancelled: the segment is unchanged."))

    def _poll(self) -> None:
        """One step of the run (at most one short request to the engine), from the timer."""
        run = self._run
        if run is None:
            self._timer.stop()
            return
        status = run.job.poll()
        if status.total:
            self.ui.progressBar.setRange(0, status.total)
            self.ui.progressBar.value = status.done
            self.ui.statusLabel.text = _("{message} ({done} of {total})").format(
                message=status.message, done=status.done, total=status.total
            )
        elif status.message:
            self.ui.statusLabel.text = status.message
        self._showDownload(status.download)
        if not run.job.done:
            return
        if self.logic.wasCancelled(run):
            self._endRun(_("Cancelled: the segment is unchanged."))
            return
        self._endRun(_("Failed: see the error message."))
        with slicer.util.tryWithErrorDisplay(_("MedSAM2 could not segment."), waitCursor=True):
            self.ui.statusLabel.text = self.logic.finish(self._parameterNode, run)
            self.ui.progressBar.value = 1
        self._updateGUI()

    def _endRun(self, message: str) -> None:
        self._timer.stop()
        self._run = None
        self.ui.progressBar.setRange(0, 1)
        self.ui.progressBar.value = 0
        self.ui.downloadProgressBar.hide()
        self.ui.statusLabel.text = message
        self._updateGUI()

    def _showDownload(self, download) -> None:
        """A model download on the engine: ``(bytes done, total bytes or None)``, or None."""
        bar = self.ui.downloadProgressBar
        if download is None:
            bar.hide()
            return
        bar.show()
        done, total = download
        if not total:  # size unknown
            bar.setRange(0, 0)
        else:
            bar.setRange(0, 1000)
            bar.value = int(1000 * done / total)
        self.ui.modelStatusLabel.text = _("downloading...")

    def _addShortcuts(self) -> None:
        mainWindow = slicer.util.mainWindow()
        if mainWindow is None:  # no main window (e.g. --no-main-window): no shortcuts
            return
        for keys, method in SHORTCUTS.items():
            shortcut = qt.QShortcut(qt.QKeySequence(keys), mainWindow)
            shortcut.setContext(qt.Qt.ApplicationShortcut)
            shortcut.activated.connect(getattr(self, method))
            shortcut.setEnabled(False)
            self._shortcuts.append(shortcut)


class MedSAM2SlicerLogic(ScriptedLoadableModuleLogic):
    """Adapts the parameter node to ``MedSAM2SlicerLib.SegmentationLogic``, which is made on first use."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._segmentation = None
        self._localEngine = None
        self._remote = None  # ((url, token), RemoteEngine)
        self._history = None

    def getParameterNode(self):
        return MedSAM2SlicerParameterNode(super().getParameterNode())

    @property
    def segmentation(self):
        """The library's logic (imports PyTorch: use after ``dependencies.ensure``)."""
        if self._segmentation is None:
            from medsam2.service.local import LocalServer
            from MedSAM2SlicerLib import LocalEngine, SegmentationLogic

            self._localEngine = LocalEngine(LocalServer(python=pythonSlicer()))
            self._segmentation = SegmentationLogic(
                model=DEFAULT_MODEL, device="auto", engine=self._localEngine, history=self.history
            )
        return self._segmentation

    # -- undo ---------------------------------------------------------------------------------------------------

    @property
    def history(self):
        """Where writes are saved as undo steps: the Segment Editor's history (no PyTorch needed)."""
        if self._history is None:
            from MedSAM2SlicerLib.history import EditorUndo

            self._history = EditorUndo(SegmentEditorAdapter())
        return self._history

    def undo(self, p) -> bool:
        """The Segment Editor's undo on the panel's segmentation; a segment it removes is no longer filled."""
        return scene_nodes().undo(p, self.history)

    def clearHistory(self) -> None:
        if self._history is not None:
            self._history.clear()

    def forgetHistory(self) -> None:
        if self._history is not None:
            self._history.forget_scenes()

    # -- engine ---------------------------------------------------------------------------------------------------

    def useEngine(self, p, token: str) -> None:
        """Run on this computer's engine server, or on the server at ``p.serverUrl`` with ``token``."""
        if p.engine == LOCAL_ENGINE:
            self.segmentation.engine = self._localEngine
            return
        if not p.serverUrl:
            raise ValueError(_("Enter the engine server's URL (Engine section)."))
        if self._remote is None or self._remote[0] != (p.serverUrl, token):
            from MedSAM2SlicerLib import RemoteEngine

            self._remote = ((p.serverUrl, token), RemoteEngine(p.serverUrl, token))
        self.segmentation.engine = self._remote[1]

    def engineDescription(self, p) -> str:
        if self._segmentation is None:
            return _("starts with the first run") if p.engine == LOCAL_ENGINE else _("not connected")
        return self._segmentation.engine.describe()

    def testConnection(self) -> str:
        """Ask the engine for its facts (starting this computer's server if needed); one line for the panel."""
        from MedSAM2SlicerLib import engines

        return engines.connection_summary(self.segmentation.engine)

    def shutdownEngine(self) -> None:
        """Stop this computer's engine server (it would also exit by itself when Slicer does)."""
        if self._localEngine is not None:
            self._localEngine.shutdown()

    # -- models ---------------------------------------------------------------------------------------------------

    def useModel(self, p) -> None:
        """Run the panel's model (registry name, or a local file at its image size) on its device."""
        localFile = p.modelName == LOCAL_FILE
        imageSize = model_choice().parse_image_size(p.modelImageSize) if localFile else None
        self.segmentation.set_model(model_choice().source(p.modelName, p.modelPath), p.device, imageSize)

    # -- prompts ------------------------------------------------------------------------------------------------

    def clearPrompts(self, p) -> None:
        for node in (p.positivePoints, p.negativePoints, p.box):
            if node is not None:
                node.RemoveAllControlPoints()
        p.maskSlice, p.maskSegmentID, p.promptViewNodeID = -1, "", ""

    # -- runs ---------------------------------------------------------------------------------------------------

    def startSegmentation(self, p) -> Run:
        """Copy the inputs out of the scene and hand the run to the engine server (GUI thread)."""
        self.useModel(p)
        prompts = panel().panel_prompts(p)
        scene_nodes().ensure_segmentation(p)  # the run adds the segment: one undo step
        request = self.segmentation.prepare(
            p.inputVolume, p.segmentation, prompts, p.segmentID or None, panel().engine_options(p)
        )
        return Run("segment", request, self.segmentation.start(request), time.time())

    def startCorrection(self, p) -> Run:
        """Queue a re-propagation of the selected segment from the slices edited since MedSAM2 wrote it."""
        if not (p.inputVolume and p.segmentation and p.segmentID):
            raise ValueError(_("Select the input volume and the corrected segment."))
        self.useModel(p)
        request, _correction = self.segmentation.prepare_correction(
            p.inputVolume, p.segmentation, p.segmentID, options=panel().engine_options(p)
        )
        return Run("correct", request, self.segmentation.start(request), time.time())

    def wasCancelled(self, run: Run) -> bool:
        from MedSAM2SlicerLib.engines import RunPhase

        return run.job.status.phase is RunPhase.CANCELLED

    def finish(self, p, run: Run) -> str:
        """Write a finished run's result into its segment (GUI thread); returns a line for the status label."""
        segmentID = self.segmentation.apply(run.request, run.job.result())
        if p is not None:
            p.segmentID = segmentID
        done = _("Corrections propagated") if run.kind == "correct" else _("Segmented")
        return _("{done} into '{name}' in {seconds:.1f} s.").format(
            done=done,
            name=run.request.segmentation_node.GetSegmentation().GetSegment(segmentID).GetName(),
            seconds=time.time() - run.started,
        )

    def process(self, p) -> str:
        """Segment synchronously (scripts): start, wait for the engine, write; returns the segment ID."""
        run = self.startSegmentation(p)
        run.job.wait()
        self.finish(p, run)
        return p.segmentID


def pythonSlicer() -> str:
    """Slicer's own Python interpreter, which runs the engine server. Inside Slicer ``sys.executable`` is the
    Slicer application itself, not a Python (as Slicer's own scripts and lassoan's SlicerMONAIAuto3DSeg find
    it: ``shutil.which("PythonSlicer")`` on the PATH that Slicer's launcher sets)."""
    import shutil

    path = shutil.which("PythonSlicer")
    if path is None:
        raise RuntimeError(
            _("Slicer's Python (PythonSlicer) was not found: the MedSAM2 engine cannot start.")
        )
    return path


def model_choice():
    """``MedSAM2SlicerLib.model_choice``, imported on first use (it needs no PyTorch)."""
    from MedSAM2SlicerLib import model_choice

    return model_choice


def panel():
    """``MedSAM2SlicerLib.panel``, imported on first use (it imports PyTorch: after ``dependencies.ensure``)."""
    from MedSAM2SlicerLib import panel

    return panel


def scene_nodes():
    """``MedSAM2SlicerLib.scene_nodes``, imported on first use (it needs no PyTorch)."""
    from MedSAM2SlicerLib import scene_nodes

    return scene_nodes


class SegmentEditorAdapter:
    """The Segment Editor module's editor (``qMRMLSegmentEditorWidget``) with the ``vtkSlicerSegmentEditorLogic``
    method names that ``MedSAM2SlicerLib.history.EditorUndo`` calls.

    Each slot used here calls that same method of the widget's logic, and its parameter node says which
    segmentation and source volume it edits (``Modules/Loadable/Segmentations/Widgets/qMRMLSegmentEditorWidget.cxx``
    in Slicer 5.10 and 5.12: ``saveStateForUndo``, ``undo``, ``setUndoEnabled``; the undo button's state is
    ``Logic->CanUndo()``). The module widget is made on first use.
    """

    @staticmethod
    def _editor():
        return slicer.modules.segmenteditor.widgetRepresentation().self().editor

    def GetSegmentationNode(self):
        return self._editor().mrmlSegmentEditorNode().GetSegmentationNode()

    def SetSegmentationNode(self, node) -> None:
        self._editor().setSegmentationNode(node)

    def GetSourceVolumeNode(self):
        return self._editor().mrmlSegmentEditorNode().GetSourceVolumeNode()

    def SetSourceVolumeNode(self, node) -> None:
        self._editor().setSourceVolumeNode(node)

    def SaveStateForUndo(self) -> None:
        self._editor().saveStateForUndo()

    def CanUndo(self) -> bool:
        return slicer.util.findChild(self._editor(), "UndoButton").enabled

    def Undo(self) -> None:
        self._editor().undo()

    def ClearUndoState(self) -> None:
        editor = self._editor()
        if editor.undoEnabled:  # setUndoEnabled(true) is the widget's way to clear its history
            editor.setUndoEnabled(True)


@contextlib.contextmanager
def signalsBlocked(*widgets):
    """Blocks the widgets' Qt signals while the parameter node is written back into them."""
    previous = [widget.blockSignals(True) for widget in widgets]
    try:
        yield
    finally:
        for widget, blocked in zip(widgets, previous):
            widget.blockSignals(blocked)


class MedSAM2SlicerTest(ScriptedLoadableModuleTest):
    """The workflow self-test; its body is ``Testing/Python/MedSAM2SlicerSelfTest.py`` (kept apart for size)."""

    def runTest(self) -> None:
        import importlib.util

        path = (
            Path(slicer.modules.medsam2slicer.path).parent / "Testing" / "Python" / "MedSAM2SlicerSelfTest.py"
        )
        spec = importlib.util.spec_from_file_location("MedSAM2SlicerSelfTest", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.MedSAM2SlicerSelfTest().runTest()
