"""The intensity window the model sees: by default, the one the volume is shown with in Slicer.

SAM 2 models see a slice as an image scaled to [0, 1]. A CT shown in the lung window and given to the model in
the abdomen window is a different picture: the lungs are black and featureless. So, by default
(:attr:`WindowSource.VIEW`), a CT goes to the model through the window/level of its scalar volume display node
(``vtkMRMLScalarVolumeDisplayNode::GetWindow``/``GetLevel``, ``Libs/MRML/Core``): what the clinician sees,
whether set by hand, by a preset (Slicer's CT-Lung is level -500, width 1400:
``Modules/Loadable/Volumes/Resources/VolumeDisplayPresets.json``) or automatically. The window maps linearly;
Slicer 5.12's logarithmic display mappings (``WindowMappingMethod``) are not reproduced. Other modalities keep
the engine's percentile rule. The panel can override the window with the engine's automatic handling, one of
its presets or a ``(level, width)`` pair.

The result is engine options of plain values (``{"modality": "ct", "window": (level, width)}``), computed on
the GUI thread, so that they can be sent to an engine server.
"""

from __future__ import annotations

from enum import Enum

import numpy as np
from vtk.util import numpy_support

from medsam2.errors import InputError
from medsam2.preprocess import DEFAULT_CT_WINDOW, WINDOW_PRESETS, guess_modality


class WindowSource(str, Enum):
    """Where the window comes from; a name of ``medsam2.preprocess.WINDOW_PRESETS`` is a source as well."""

    VIEW = "view"  # CT: the display node's window; other modalities: percentiles
    AUTO = "auto"  # the engine decides: its abdomen window on CT, percentiles otherwise
    CUSTOM = "custom"  # a (level, width) pair given with it


# The panel's choices, in the order it lists them.
WINDOW_CHOICES = [
    WindowSource.VIEW.value,
    WindowSource.AUTO.value,
    *WINDOW_PRESETS,
    WindowSource.CUSTOM.value,
]


def display_window(volume_node) -> tuple[float, float] | None:
    """``(level, width)`` the volume is shown with; None when it has no scalar display node."""
    display = volume_node.GetDisplayNode()
    if display is None or not display.IsA("vtkMRMLScalarVolumeDisplayNode"):
        return None
    width = float(display.GetWindow())
    return (float(display.GetLevel()), width) if width > 0 else None


def volume_modality(volume_node) -> str:
    """``"ct"`` when the voxels look like Hounsfield units (``medsam2.preprocess.guess_modality``), else
    ``"other"``. Reads the voxels in place (nothing is copied or changed), once per version of the voxels."""
    image = volume_node.GetImageData()
    scalars = image.GetPointData().GetScalars() if image is not None else None
    if scalars is None:
        raise InputError(f"Volume '{volume_node.GetName()}' has no image data")
    key = (volume_node.GetID(), scalars.GetAddressAsString("vtkDataArray"), scalars.GetMTime())
    if key not in _MODALITIES:
        if len(_MODALITIES) >= 8:
            _MODALITIES.pop(next(iter(_MODALITIES)))
        _MODALITIES[key] = guess_modality(numpy_support.vtk_to_numpy(scalars).reshape(-1, 1))
    return _MODALITIES[key]


# The panel asks on every change it shows; the guess reads the whole volume.
_MODALITIES: dict[tuple, str] = {}


def window_options(
    volume_node,
    source: WindowSource | str = WindowSource.VIEW,
    level: float | None = None,
    width: float | None = None,
) -> dict:
    """Engine options (``modality``, ``window``) for ``volume_node`` from a window ``source``.

    ``level`` and ``width`` are used with :attr:`WindowSource.CUSTOM` only.
    """
    if source in WINDOW_PRESETS:
        return {"modality": "ct", "window": str(source)}
    try:
        source = WindowSource(source)
    except ValueError:
        raise InputError(f"Unknown window {source!r}: expected one of {', '.join(WINDOW_CHOICES)}") from None
    if source is WindowSource.AUTO:
        return {"modality": "auto"}
    if source is WindowSource.CUSTOM:
        if level is None or width is None or not (np.isfinite(level) and np.isfinite(width) and width > 0):
            raise InputError(f"A custom window needs a level and a positive width, got {level}, {width}")
        return {"modality": "ct", "window": (float(level), float(width))}
    if volume_modality(volume_node) != "ct":
        return {"modality": "other"}
    shown = display_window(volume_node)
    return {"modality": "ct", "window": shown} if shown else {"modality": "ct"}


def describe(options: dict) -> str:
    """A line for the panel: what the model will see with these options."""
    window = options.get("window")
    if isinstance(window, str):
        level, width = WINDOW_PRESETS[window]
        return f"{window} preset: level {level:g}, width {width:g}"
    if window is not None:
        return f"level {window[0]:g}, width {window[1]:g}"
    if options.get("modality") == "ct":
        level, width = WINDOW_PRESETS[DEFAULT_CT_WINDOW]
        return f"CT, not displayed: {DEFAULT_CT_WINDOW} window, level {level:g}, width {width:g}"
    if options.get("modality") == "other":
        return "not CT: 0.5-99.5 percentiles"
    return "automatic: abdomen window for CT, percentiles otherwise"
