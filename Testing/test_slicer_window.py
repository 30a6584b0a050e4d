"""The model sees what the clinician sees: the intensity window comes from the volume's display node.

On a slicer-core scene the display node is Slicer's own ``vtkMRMLScalarVolumeDisplayNode``; "the lung window" is
Slicer's CT-Lung preset (level -500, width 1400: ``Modules/Loadable/Volumes/Resources/VolumeDisplayPresets.json``).
"""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import slicer
from slicer_scene import load_ct, load_segmentation, make_volume

import medsam2
from medsam2.errors import InputError
from medsam2.metrics import dice
from medsam2.preprocess import windowed_intensities
from MedSAM2SlicerLib import SegmentationLogic, panel, read_segment_mask, volume_geometry
from MedSAM2SlicerLib.geometry import volume_array
from MedSAM2SlicerLib.window import WINDOW_CHOICES, display_window, window_options

SLICER_CT_LUNG = (-500.0, 1400.0)
SLICER_CT_ABDOMEN = (40.0, 350.0)


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def shown_ct(scene, level_width=SLICER_CT_LUNG):
    volume = load_ct(scene)
    volume.CreateDefaultDisplayNodes()
    display = volume.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(level_width[1], level_width[0])  # vtkMRMLScalarVolumeDisplayNode: (window, level)
    return volume


class RecordingEngine:
    """The real ``medsam2.segment_volume`` (tiny golden model, prompt axis only), keeping what it was given."""

    def __init__(self) -> None:
        self.calls = []

    def __call__(self, model, volume, prompts, **options):
        self.calls.append(SimpleNamespace(volume=volume.copy(), options=dict(options)))
        options.update(orientations=1)
        self.calls[-1].result = medsam2.segment_volume(model, volume, prompts, **options)
        return self.calls[-1].result

    def intensities(self, n: int) -> np.ndarray:
        """What the model was given in call ``n``: the volume as the engine windows it."""
        call = self.calls[n]
        window = {k: call.options[k] for k in ("modality", "window") if k in call.options}
        return windowed_intensities(call.volume, **window)[0]


def test_the_display_window_is_what_the_model_gets_and_changing_it_changes_that(scene):
    from golden import golden_model

    volume = shown_ct(scene)
    voxels = volume_array(volume).astype(np.float32)
    engine = RecordingEngine()
    logic = SegmentationLogic(model=golden_model(), engine=engine)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    prompt = medsam2.prompts.Prompt(axis=0, index=12, box=(61, 34, 109, 96))

    logic.segment(volume, segmentation, [prompt])  # no window passed
    assert engine.calls[0].options["window"] == SLICER_CT_LUNG
    low, high = -1200.0, 200.0  # level -500 -/+ width 1400 / 2
    np.testing.assert_allclose(
        engine.intensities(0), (np.clip(voxels, low, high) - low) / (high - low), atol=1e-6
    )
    assert engine.calls[0].result.window == SLICER_CT_LUNG  # the result records the window it used

    volume.GetDisplayNode().SetWindowLevel(SLICER_CT_ABDOMEN[1], SLICER_CT_ABDOMEN[0])
    logic.segment(volume, segmentation, [prompt])
    low, high = 40.0 - 175.0, 40.0 + 175.0
    np.testing.assert_allclose(
        engine.intensities(1), (np.clip(voxels, low, high) - low) / (high - low), atol=1e-6
    )
    assert engine.calls[1].result.window == SLICER_CT_ABDOMEN
    lungs = voxels < -400  # the lung window shows the lungs' texture, the abdomen window makes them black
    assert np.ptp(engine.intensities(0)[lungs]) > 0.5 and np.ptp(engine.intensities(1)[lungs]) == 0.0

    # A window the caller passes wins over the display.
    logic.segment(volume, segmentation, [prompt], options={"window": "bone"})
    assert engine.calls[2].options["window"] == "bone" and "modality" not in engine.calls[2].options
    assert engine.calls[2].result.window == (400.0, 1800.0)


def test_non_ct_keeps_the_percentiles_whatever_the_display(scene):
    from golden import golden_model

    rng = np.random.default_rng(0)
    mr = rng.gamma(2.0, 150.0, size=(12, 40, 40)).astype(np.float32)  # MR-like: positive, no air
    volume = make_volume(scene, mr, np.diag([1.0, 1.0, 3.0, 1.0]), "MR")
    volume.CreateDefaultDisplayNodes()
    volume.GetDisplayNode().SetWindowLevel(100.0, 50.0)
    engine = RecordingEngine()
    logic = SegmentationLogic(model=golden_model(), engine=engine)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    logic.segment(volume, segmentation, [medsam2.prompts.Prompt(axis=0, index=6, box=(5, 5, 30, 30))])
    assert engine.calls[0].options["modality"] == "other" and "window" not in engine.calls[0].options
    low, high = np.percentile(mr, (0.5, 99.5))
    np.testing.assert_allclose(engine.calls[0].result.window, ((low + high) / 2, high - low), rtol=1e-5)


def test_window_choices_are_plain_engine_options(scene):
    volume = shown_ct(scene)
    assert display_window(volume) == SLICER_CT_LUNG
    assert window_options(volume, "view") == {"modality": "ct", "window": SLICER_CT_LUNG}
    assert window_options(volume, "auto") == {"modality": "auto"}
    assert window_options(volume, "mediastinum") == {"modality": "ct", "window": "mediastinum"}
    assert window_options(volume, "custom", 35, 80) == {"modality": "ct", "window": (35.0, 80.0)}
    with pytest.raises(InputError, match="positive width"):
        window_options(volume, "custom", 35, 0)
    with pytest.raises(InputError, match="Unknown window 'soft'"):
        window_options(volume, "soft")
    bare = load_ct(scene)  # never displayed: the engine's CT default
    assert display_window(bare) is None and window_options(bare, "view") == {"modality": "ct"}

    p = SimpleNamespace(
        inputVolume=volume,
        orientations=6,
        aggregation="confidence",
        memoryPolicy="self-sorting",
        confidenceThreshold=0.5,
        windowSource="view",
        windowLevel=40.0,
        windowWidth=400.0,
    )
    options = panel.engine_options(p)
    sent = {**options, "memory": dataclasses.asdict(options["memory"])}
    assert json.loads(json.dumps(sent)) == {**sent, "window": list(SLICER_CT_LUNG)}  # fits an HTTP request
    assert panel.window_description(p) == "level -500, width 1400"
    p.windowSource = "lung"
    assert panel.window_description(p) == "lung preset: level -600, width 1500"
    assert WINDOW_CHOICES[:2] == ["view", "auto"] and WINDOW_CHOICES[-1] == "custom"


@pytest.mark.slow
def test_right_lung_in_the_lung_window_without_a_window_passed(scene):
    """medsam2-lite, default options, a box on the right lung of CTChest4 shown in Slicer's CT-Lung window."""
    volume = shown_ct(scene)
    reference = load_segmentation(scene)
    lung = read_segment_mask(
        reference,
        reference.GetSegmentation().GetSegmentIdBySegmentName("right lung"),
        volume_geometry(volume),
    )
    index = int(np.argmax(lung.sum(axis=(1, 2))))
    rows, columns = np.nonzero(lung[index])
    box = (columns.min(), rows.min(), columns.max(), rows.max())
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    logic = SegmentationLogic(model="medsam2-lite", device="cpu")
    segment_id = logic.segment(volume, segmentation, [medsam2.prompts.Prompt(axis=0, index=index, box=box)])
    result = read_segment_mask(segmentation, segment_id, volume_geometry(volume))
    score = dice(result, lung)
    print(f"right lung, Slicer's lung window, no window passed: 3D Dice {score:.3f}")
    assert score >= 0.75
