"""Slicer adapters for the MedSAM2 engine: MRML nodes <-> numpy, prompts from markups, the intensity window,
segment writing as Segment Editor undo steps, and the engine server that runs segmentations outside the Slicer
process. Needs only what the ``slicer-core`` wheel provides (MRML, vtk) and the ``medsam2`` engine.

The names below are imported on first use, so that ``MedSAM2SlicerLib.dependencies`` (which installs PyTorch
inside Slicer) can be imported before PyTorch is there.
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "LocalEngine": "engines",
    "RemoteEngine": "engines",
    "ServerEngine": "engines",
    "ServerRun": "engines",
    "VolumeGeometry": "geometry",
    "volume_array": "geometry",
    "volume_geometry": "geometry",
    "EditorUndo": "history",
    "OwnUndo": "history",
    "Correction": "logic",
    "Request": "logic",
    "SegmentationLogic": "logic",
    "object_mask": "logic",
    "MaskSegment": "prompts",
    "prompts_from_nodes": "prompts",
    "SegmentWriter": "segment_writer",
    "ensure_converter_rules": "segments",
    "read_segment_mask": "segments",
    "WindowSource": "window",
    "window_options": "window",
}

__all__ = sorted(_EXPORTS)


_SUBMODULES = {"history", "panel", "scene_nodes", "window"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{module}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
