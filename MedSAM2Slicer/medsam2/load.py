"""``load_model``: a checkpoint file or a registry name -> a ready model on the chosen device."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import check_compatible, read_state_dict, resolve_config
from .configs import ModelConfig
from .errors import MedSAM2Error
from .model.build import build_model
from .model.sam2 import SAM2Model

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then Apple MPS, then the CPU; an explicit device must be available."""
    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MedSAM2Error("device='cuda' was asked for, but PyTorch sees no CUDA GPU (use 'auto' or 'cpu')")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise MedSAM2Error("device='mps' was asked for, but Apple MPS is not available (use 'auto' or 'cpu')")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise MedSAM2Error(f"Unknown device {device!r}: use auto, cuda, cuda:N, mps or cpu") from exc


def resolve_autocast(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for inference: ``None`` (float32) unless bfloat16/float16 is asked for on a GPU."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise MedSAM2Error(f"Unknown dtype {dtype!r}: use float32, bfloat16 or float16")
        dtype = _DTYPES[dtype]
    if dtype == torch.float32:
        return None
    if device.type != "cuda":
        raise MedSAM2Error(
            f"Reduced precision ({dtype}) is offered on CUDA only; on {device.type} use float32"
        )
    return dtype


def load_model(
    source: str | os.PathLike,
    config: ModelConfig | str | None = None,
    image_size: int | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
) -> SAM2Model:
    """Load a model from a checkpoint path or a registry name (see ``medsam2.models``).

    ``config`` (a ``ModelConfig`` or a preset name) is detected from the checkpoint's keys and shapes when
    not given; ``image_size`` overrides the input size. ``dtype`` ``"bfloat16"`` runs inference under CUDA
    autocast (weights stay float32).
    """
    from . import models

    device = resolve_device(device)
    autocast = resolve_autocast(dtype, device)
    path = Path(source)
    entry = None
    if not path.exists() and models.is_registered(str(source)):
        entry = models.get(str(source))
        path = models.fetch(entry)
        if config is None:
            config = entry.preset
        if image_size is None:
            image_size = entry.image_size
    state_dict = read_state_dict(path)
    if entry is not None and entry.prepare is not None:
        state_dict = entry.prepare(state_dict)
    config = resolve_config(state_dict, config, str(path), image_size)
    model = build_model(config)
    check_compatible(model, state_dict, str(path))
    model.load_state_dict(state_dict, strict=True)
    model.autocast_dtype = autocast
    return model.to(device).eval()
