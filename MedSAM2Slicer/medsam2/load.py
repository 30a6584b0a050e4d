"""``load_model``: a checkpoint file or a registry name -> a ready model on the chosen device."""

from __future__ import annotations

import os
import warnings
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


def resolve_autocast(
    dtype: str | torch.dtype | None, device: torch.device, allow_cpu_autocast: bool = False
) -> torch.dtype | None:
    """The autocast dtype for inference: ``None`` (float32) unless reduced precision is asked for.

    On CUDA bfloat16 and float16 are offered. On the CPU, bfloat16 autocast runs only when
    ``allow_cpu_autocast`` says so: it is slower there than float32 and exists to exercise the reduced-precision
    path (memory storage, pointers, the upstream pipeline's autocast) on machines without a GPU.
    """
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise MedSAM2Error(f"Unknown dtype {dtype!r}: use float32, bfloat16 or float16")
        dtype = _DTYPES[dtype]
    if dtype == torch.float32:
        return None
    if device.type == "cuda":
        return dtype
    if device.type == "cpu" and allow_cpu_autocast and dtype == torch.bfloat16:
        return dtype
    hint = " (bfloat16 on the CPU with allow_cpu_autocast=True, for testing)" if device.type == "cpu" else ""
    raise MedSAM2Error(
        f"Reduced precision ({dtype}) is offered on CUDA only{hint}; on {device.type} use float32"
    )


class ImageSizeGuessed(UserWarning):
    """A checkpoint loaded by path runs at its preset's default input size, which may not be the trained one."""


def load_model(
    source: str | os.PathLike,
    config: ModelConfig | str | None = None,
    image_size: int | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    allow_cpu_autocast: bool = False,
) -> SAM2Model:
    """Load a model from a checkpoint path or a registry name (see ``medsam2.models``).

    A file given by path that is a registered checkpoint (recognised by its sha256) gets that entry's preset
    and input size, as a name would. Otherwise ``config`` (a ``ModelConfig`` or a preset name) is detected
    from the keys and shapes when not given, and ``image_size`` sets the input size; without it the preset's
    default is used and an ``ImageSizeGuessed`` warning says so. ``dtype`` ``"bfloat16"`` runs inference
    under autocast (weights stay float32): on CUDA, or on the CPU with ``allow_cpu_autocast=True``.
    """
    from . import models

    device = resolve_device(device)
    autocast = resolve_autocast(dtype, device, allow_cpu_autocast)
    size_given = image_size is not None or isinstance(config, ModelConfig)
    path = Path(source).expanduser()
    if not path.exists() and models.is_registered(str(source)):
        entry = models.get(str(source))
        path = models.fetch(entry)
    else:
        entry = models.identify(path) if path.is_file() else None
    if entry is not None and not isinstance(config, ModelConfig):
        config = entry.preset if config is None else config
        image_size = entry.image_size if image_size is None else image_size
    state_dict = read_state_dict(path)
    if entry is not None and entry.prepare is not None:
        state_dict = entry.prepare(state_dict)
    config = resolve_config(state_dict, config, str(path), image_size)
    model = build_model(config)
    check_compatible(model, state_dict, str(path))
    model.load_state_dict(state_dict, strict=True)  # casts bfloat16/float16 files to the float32 weights
    # LiteMedSAM's encoder has one input size; only Hiera models are run at several.
    if entry is None and not size_given and config.image_encoder == "hiera":
        _warn_guessed_size(path, config)
    model.autocast_dtype = autocast
    return model.to(device).eval()


def _warn_guessed_size(path: Path, config: ModelConfig) -> None:
    from . import models

    namesake = next((e for e in map(models.get, models.names()) if e.filename == path.name), None)
    hint = (
        f" It is named like the registered {namesake.name}, which its authors run at {namesake.image_size} px."
        if namesake is not None and namesake.image_size != config.image_size
        else ""
    )
    warnings.warn(
        f"{path.name} is not a registered checkpoint (its sha256 matches no entry), so its input size was "
        f"guessed: {config.image_size} px, the default of {config.name}.{hint} Pass image_size= (CLI: "
        f"--image-size) with the size it was trained at.",
        ImageSizeGuessed,
        stacklevel=3,
    )
