"""Slicer adapters for the MedSAM2 engine: MRML nodes <-> numpy, prompts from markups, segment writing and a
worker thread. Needs only what the ``slicer-core`` wheel provides (MRML, vtk) and the ``medsam2`` engine."""

from .geometry import VolumeGeometry, volume_array, volume_geometry
from .logic import Correction, Request, SegmentationLogic, object_mask
from .prompts import MaskSegment, prompts_from_nodes
from .segment_writer import SegmentWriter
from .segments import ensure_converter_rules, read_segment_mask
from .worker import Job, Progress, Worker

__all__ = [
    "Correction",
    "Job",
    "MaskSegment",
    "Progress",
    "Request",
    "SegmentWriter",
    "SegmentationLogic",
    "VolumeGeometry",
    "Worker",
    "ensure_converter_rules",
    "object_mask",
    "prompts_from_nodes",
    "read_segment_mask",
    "volume_array",
    "volume_geometry",
]
