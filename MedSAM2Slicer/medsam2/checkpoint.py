"""Reading and writing checkpoints without ever unpickling code, and recognising which model a file holds."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from .configs import PRESETS, ModelConfig
from .errors import CheckpointError

# (embedding width of the first Hiera stage, number of Hiera blocks) -> size letter of the preset.
_HIERA_SIGNATURES = {(96, 12): "t", (96, 16): "s", (112, 24): "b+", (144, 48): "l"}
_SAM21_ONLY_KEYS = ("no_obj_embed_spatial", "obj_ptr_tpos_proj.weight", "obj_ptr_tpos_proj.bias")
# TinyViT's first convolution: only the LiteMedSAM-based medsam2_lite model has it.
_TINYVIT_KEY_PREFIX = "image_encoder.trunk.patch_embed.seq."
_BLOCK_KEY = re.compile(r"^image_encoder\.trunk\.blocks\.(\d+)\.")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: ``{"model": state_dict}`` or a bare state dict, ``.pt``/``.pth`` or
    ``.safetensors``. Pickle files are read with ``weights_only=True``: a file that would need to run code
    is refused, and its code is not run."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist or is not a file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler fails on junk in many ways (IndexError, KeyError, ...)
        if isinstance(exc, pickle.UnpicklingError) and "Unsupported global" in str(exc):
            global_line = next(line for line in str(exc).splitlines() if "Unsupported global" in line)
            raise CheckpointError(
                f"Checkpoint {path} was refused: loading it would execute code "
                f"({global_line.strip().split('. ')[0]}). Only weights-only checkpoints are accepted."
            ) from None
        raise CheckpointError(
            f"Checkpoint {path} cannot be read (truncated or not a checkpoint): {_first_line(exc)}"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise CheckpointError(
            f"Checkpoint {path} does not hold a state dict (expected {{'model': {{name: tensor}}}} or "
            f"{{name: tensor}}, found {type(obj).__name__})"
        )
    return obj


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"Checkpoint {path} cannot be read as safetensors: {_first_line(exc)}"
        ) from None


def save_state_dict(
    model: torch.nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write the model's weights as safetensors (written to a temporary file, then renamed)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".partial")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def detect_preset(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The official preset whose keys and shapes a state dict has (``"sam2.1_hiera_t"``, ...), or ``None``."""
    if any(k.startswith(_TINYVIT_KEY_PREFIX) for k in state_dict):
        return "medsam2_lite"
    pos_embed = state_dict.get("image_encoder.trunk.pos_embed")
    if pos_embed is None or pos_embed.ndim != 4:
        return None
    blocks = {int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k))}
    size = _HIERA_SIGNATURES.get((pos_embed.shape[1], len(blocks)))
    if size is None:
        return None
    version = "sam2.1" if any(k in state_dict for k in _SAM21_ONLY_KEYS) else "sam2"
    return f"{version}_hiera_{size}"


def describe_variant(state_dict: dict[str, torch.Tensor]) -> str:
    """A short description of what a state dict looks like, for error messages."""
    preset = detect_preset(state_dict)
    if preset is not None:
        return preset
    if "image_encoder.trunk.pos_embed" in state_dict:
        return "an unrecognised Hiera-based SAM 2 model"
    if any(k.startswith("image_encoder.") for k in state_dict):
        return "a SAM-style model with an unrecognised image encoder"
    return "not a SAM 2 model"


def check_compatible(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise ``CheckpointError`` naming missing, unexpected and mis-shaped keys, if any."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mis_shaped = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if not (missing or unexpected or mis_shaped):
        return
    name = getattr(getattr(model, "config", None), "name", type(model).__name__)
    lines = [f"Checkpoint {source} (detected: {describe_variant(state_dict)}) does not fit model {name}."]
    # Every key is named: a file that loads only partly must never pass silently, nor be hard to diagnose.
    for title, keys in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", mis_shaped),
    ):
        if keys:
            lines.append(f"  {len(keys)} {title}: {', '.join(keys)}")
    raise CheckpointError("\n".join(lines))


def resolve_config(
    state_dict: dict[str, torch.Tensor], config: ModelConfig | str | None, source: str, image_size: int | None
) -> ModelConfig:
    """The config to build: given explicitly (object or preset name) or detected from the keys and shapes."""
    if isinstance(config, ModelConfig):
        return config if image_size is None else config.with_image_size(image_size)
    if config is None:
        config = detect_preset(state_dict)
        if config is None:
            raise CheckpointError(
                f"Cannot tell which model checkpoint {source} holds (detected: {describe_variant(state_dict)}); "
                f"pass config= one of {', '.join(PRESETS)} or a ModelConfig"
            )
    return ModelConfig.preset(config, image_size)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
