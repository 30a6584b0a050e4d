"""MedSAM-2 engine: SAM 2 family models, memory policies, volume and one-prompt segmentation."""

from .checkpoint import read_state_dict, save_state_dict
from .configs import ModelConfig
from .errors import Cancelled, CheckpointError, InputError, MedSAM2Error
from .images import segment_images
from .lite import register as _register_lite
from .load import ImageSizeGuessed, load_model, resolve_device
from .memory import MemoryOptions
from .model.build import build_model
from .model.sam2 import SAM2Model
from .prompts import Prompt
from .session import Session
from .volume import VolumeResult, segment_volume

__all__ = [
    "Cancelled",
    "CheckpointError",
    "InputError",
    "MedSAM2Error",
    "MemoryOptions",
    "ImageSizeGuessed",
    "ModelConfig",
    "Prompt",
    "SAM2Model",
    "Session",
    "VolumeResult",
    "build_model",
    "load_model",
    "read_state_dict",
    "resolve_device",
    "save_state_dict",
    "segment_images",
    "segment_volume",
]
__version__ = "0.1.0"

_register_lite()  # the medsam2-lite registry entry; reads no file
