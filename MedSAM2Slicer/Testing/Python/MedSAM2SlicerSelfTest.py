"""The MedSAM2 module's workflow, run inside Slicer through its panel on a real CT.

Run with ``slicer.selfTests['MedSAM2Slicer']()`` (the module's test class loads this file) or, in a build
tree, through ctest. Steps: load a chest CT and show it in Slicer's CT-Lung window; place a box ROI on an
axial slice around the right lung; segment with the default model ``medsam2-lite``, which must see the lung
window; undo with the panel, which must remove the new segment and leave none selected; segment again; check
the segment lies on the volume's grid (and, with the real weights, that it is there and inside the box);
redraw one slice as a Segment Editor effect does and propagate the correction, which must keep the redrawn
slice; undo twice, which must take back the correction and then the redrawing, in order; start a run and
cancel it, which must leave the segment unchanged. Every run goes through the local engine server that the
module starts as its child process.

Where the medsam2-lite weights are not available offline, a random-weight medsam2-lite file is written into a
temporary models folder and used instead (the log says so): every step still runs, but what the random
model segments is not checked.
"""

import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

# A box around the right lung below its apex, in RAS mm: the extent of the 'right lung' segment of slicerio's
# Segmentation.seg.nrrd on CTChest4's axial slice S = -60.25 mm, plus a few mm. CTChest and CTChest4 cover
# the same patient space, so it fits either.
BOX_CENTER = (45.0, -15.5, -60.25)
BOX_SIZE = (125.0, 140.0, 1.0)
RUN_TIMEOUT_S = 1800.0


class MedSAM2SlicerSelfTest(ScriptedLoadableModuleTest):
    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_workflow()

    def test_workflow(self) -> None:
        from MedSAM2SlicerLib import dependencies

        dependencies.ensure()  # in testing mode Slicer's dialogs answer OK by themselves
        volume = self.loadChestCT()
        volume.GetDisplayNode().AutoWindowLevelOff()
        volume.GetDisplayNode().SetWindowLevel(1400.0, -500.0)  # Slicer's CT-Lung preset
        slicer.util.selectModule("MedSAM2Slicer")
        widget = slicer.util.getModuleWidget("MedSAM2Slicer")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "MedSAM2 self-test")
        segmentation.CreateDefaultDisplayNodes()
        p = widget.logic.getParameterNode()
        p.inputVolume, p.segmentation, p.segmentID = volume, segmentation, ""
        p.modelName, p.device, p.orientations = "medsam2-lite", "auto", 1
        widget.logic.clearPrompts(p)
        from MedSAM2SlicerLib import scene_nodes

        scene_nodes.prompt_node(p, "box", slicer.mrmlScene)  # as the Place button makes it
        p.box.SetCenter(*BOX_CENTER)
        p.box.SetSize(*BOX_SIZE)
        p.promptViewNodeID = "vtkMRMLSliceNodeRed"  # placed in the axial view
        promptSlice = self.axialIndex(volume, BOX_CENTER)

        with self.defaultModelWeights(widget.logic) as realWeights:
            self.delayDisplay(f"Segmenting from a box on axial slice {promptSlice}")
            self.clickAndWait(widget, widget.ui.applyButton, "Segmented")
            self.assertIn("level -500, width 1400", widget.ui.windowDescriptionLabel.text)
            created = p.segmentID
            widget.ui.undoButton.click()  # the Segment Editor's undo: the new segment goes, none is selected
            self.assertIsNone(segmentation.GetSegmentation().GetSegment(created))
            self.assertEqual(p.segmentID, "")
            self.clickAndWait(widget, widget.ui.applyButton, "Segmented")
            segmentID = p.segmentID
            self.assertTrue(segmentID, widget.ui.statusLabel.text)
            self.assertSegmentOnVolumeGrid(segmentation, segmentID, volume)
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentID, volume)
            self.assertEqual(mask.shape, slicer.util.arrayFromVolume(volume).shape)
            if realWeights:
                self.assertGreater(int(mask[promptSlice].sum()), 0, "empty on the prompt slice")
                self.assertGreater(self.fractionInBox(volume, mask, promptSlice), 0.8)
            else:
                logging.warning(
                    "Random weights: the segment's content (%d voxels) is not checked", mask.sum()
                )

            self.delayDisplay("Redrawing one slice and propagating the correction")
            edited = mask.astype(np.uint8)
            correctedSlice = min(promptSlice + 2, mask.shape[0] - 1)
            edited[correctedSlice] = self.disk(volume, BOX_CENTER, radiusMm=20.0, shape=mask.shape[1:])
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
            self.assertIs(editor.mrmlSegmentEditorNode().GetSegmentationNode(), segmentation)
            editor.saveStateForUndo()  # as an effect does before it paints
            slicer.util.updateSegmentBinaryLabelmapFromArray(edited, segmentation, segmentID, volume)
            self.clickAndWait(widget, widget.ui.propagateCorrectionsButton, "Corrections propagated")
            corrected = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentID, volume)
            np.testing.assert_array_equal(corrected[correctedSlice], edited[correctedSlice])
            self.assertEqual(p.segmentID, segmentID)

            self.delayDisplay("Undoing the correction, then the redrawing")
            widget.ui.undoButton.click()
            current = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentID, volume)
            np.testing.assert_array_equal(current, edited)
            editor.undo()  # Ctrl+Z in the Segment Editor: the same history
            current = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentID, volume)
            np.testing.assert_array_equal(current, mask)
            editor.redo()
            editor.redo()
            np.testing.assert_array_equal(
                slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentID, volume), corrected
            )

            self.delayDisplay("Starting a run and cancelling it")
            widget.ui.applyButton.click()
            self.assertTrue(widget.busy, widget.ui.statusLabel.text)
            widget.ui.applyButton.click()  # the same button cancels
            self.waitForRun(widget)
            self.assertIn("Cancelled", widget.ui.statusLabel.text)
            np.testing.assert_array_equal(
                slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentID, volume), corrected
            )
        self.delayDisplay("MedSAM2 workflow test passed")

    # -- data -----------------------------------------------------------------------------------------------------

    def loadChestCT(self):
        """SampleData's CTChest when it can be downloaded, else the small CTChest4 that slicerio ships."""
        try:
            import SampleData

            volume = SampleData.downloadSample("CTChest")
            if volume is not None:
                self.delayDisplay("Loaded SampleData CTChest")
                return volume
        except Exception as error:  # offline: fall back to the bundled copy
            logging.info("SampleData CTChest is not available (%s); using slicerio's CTChest4", error)
        try:
            import slicerio
        except ModuleNotFoundError:
            slicer.util.pip_install("slicerio")
            import slicerio
        volume = slicer.util.loadVolume(str(Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd"))
        self.delayDisplay("Loaded slicerio's CTChest4")
        return volume

    @contextlib.contextmanager
    def defaultModelWeights(self, logic):
        """Yields True with the real medsam2-lite, False with a random-weight stand-in (see the module notes)."""
        import torch

        import medsam2
        from medsam2 import models

        entry = models.get("medsam2-lite")
        try:
            models.fetch(entry)
            available = True
        except medsam2.MedSAM2Error as error:
            logging.warning(
                "medsam2-lite weights are not available (%s). The self-test uses a RANDOM-WEIGHT medsam2-lite "
                "written to a temporary models folder: the workflow is exercised, the segment's content is not "
                "checked.",
                error,
            )
            available = False
        if available:
            yield True
            return
        previous = os.environ.get(models.CACHE_ENV)
        with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as folder:
            torch.manual_seed(0)
            medsam2.save_state_dict(
                medsam2.build_model(medsam2.ModelConfig.preset(entry.preset)), Path(folder) / entry.filename
            )
            os.environ[models.CACHE_ENV] = folder
            try:
                logic.shutdownEngine()  # the engine server reads the models folder when it starts
                yield False
            finally:
                logic.shutdownEngine()  # the random model must not outlive the test
                if previous is None:
                    os.environ.pop(models.CACHE_ENV, None)
                else:
                    os.environ[models.CACHE_ENV] = previous

    # -- helpers --------------------------------------------------------------------------------------------------

    def clickAndWait(self, widget, button, expectedStatus: str) -> None:
        button.click()
        self.waitForRun(widget)
        self.assertTrue(
            widget.ui.statusLabel.text.startswith(expectedStatus),
            f"expected '{expectedStatus}...', the status says: {widget.ui.statusLabel.text}",
        )

    def waitForRun(self, widget) -> None:
        """Let Slicer's own event loop run until the panel's run ends. The engine works in its server process;
        the panel's QTimer polls it. No ``time.sleep``: it would release the GIL, which Slicer's event loop
        never does, and so hide what a user's Slicer does (see MedSAM2SlicerLib/engines.py)."""
        deadline = time.time() + RUN_TIMEOUT_S
        while widget.busy:
            if time.time() > deadline:
                widget.ui.applyButton.click()
                self.fail(f"The run did not finish within {RUN_TIMEOUT_S} s")
            # Blocks in Qt until an event comes: at the latest the panel's 100 ms poll timer.
            slicer.app.processEvents(qt.QEventLoop.AllEvents | qt.QEventLoop.WaitForMoreEvents)
        slicer.app.processEvents()

    def rasToIJK(self, volume, ras) -> np.ndarray:
        matrix = vtk.vtkMatrix4x4()
        volume.GetRASToIJKMatrix(matrix)
        return np.array(matrix.MultiplyPoint((*ras, 1.0))[:3])

    def axialIndex(self, volume, ras) -> int:
        """The array index (k) of the axial slice through ``ras``; the test volumes are axial."""
        k = int(np.floor(self.rasToIJK(volume, ras)[2] + 0.5))
        self.assertTrue(0 <= k < volume.GetImageData().GetDimensions()[2], "the box lies outside the volume")
        return k

    def fractionInBox(self, volume, mask, k) -> float:
        """Fraction of the segment's voxels on slice ``k`` whose centres lie inside the box (in R and A)."""
        j, i = np.nonzero(mask[k])
        matrix = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(matrix)
        ijkToRAS = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
        ras = (ijkToRAS @ np.stack([i, j, np.full_like(i, k), np.ones_like(i)]))[:2]
        low = np.array(BOX_CENTER[:2]) - np.array(BOX_SIZE[:2]) / 2
        high = np.array(BOX_CENTER[:2]) + np.array(BOX_SIZE[:2]) / 2
        inside = np.all((low <= ras.T) & (high >= ras.T), axis=1)
        return float(inside.mean()) if inside.size else 0.0

    def disk(self, volume, centerRAS, radiusMm: float, shape) -> np.ndarray:
        """A filled circle on an axial slice image ``[J, I]`` around ``centerRAS`` (a hand-drawn correction)."""
        ci, cj, _ = self.rasToIJK(volume, centerRAS)
        spacing = volume.GetSpacing()
        j, i = np.ogrid[: shape[0], : shape[1]]
        return (((i - ci) * spacing[0]) ** 2 + ((j - cj) * spacing[1]) ** 2 <= radiusMm**2).astype(np.uint8)

    def assertSegmentOnVolumeGrid(self, segmentation, segmentID, volume) -> None:
        """The segment's labelmap has the volume's voxel grid: same IJK-to-RAS matrix."""
        labelmap = (
            segmentation.GetSegmentation()
            .GetSegment(segmentID)
            .GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
        )
        self.assertIsNotNone(labelmap)
        imageToWorld, ijkToRAS = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(imageToWorld)
        volume.GetIJKToRASMatrix(ijkToRAS)
        for r in range(3):
            for c in range(4):
                self.assertAlmostEqual(imageToWorld.GetElement(r, c), ijkToRAS.GetElement(r, c), places=4)
