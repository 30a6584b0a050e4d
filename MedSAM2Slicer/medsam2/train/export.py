"""Writing the shipped ``medsam2-lite`` weights and their provenance from a training checkpoint."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from ..lite import litemedsam_to_model_keys
from ..model.sam2 import SAM2Model


def provenance_path(weights: str | Path) -> Path:
    """The provenance JSON that goes with a weights file: beside it, same name, ``.json``."""
    return Path(weights).with_suffix(".json")


def export_weights(
    model: SAM2Model,
    litemedsam_state_dict: dict[str, torch.Tensor],
    out: str | os.PathLike,
    provenance: dict,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write every tensor of ``model`` that LiteMedSAM does not provide, or that training changed.

    ``litemedsam_state_dict``: LiteMedSAM's file as read (its keys are renamed here). Tensors are stored as
    ``dtype``; float32 keeps them exact and the file is a few MB (``medsam2.lite`` casts any dtype back to
    float32). Next to ``out`` a ``.json`` file records ``provenance`` plus the tensor count, size and date.
    """
    from safetensors.torch import save_file

    pretrained = litemedsam_to_model_keys(litemedsam_state_dict)
    tensors = {}
    for key, value in model.state_dict().items():
        original = pretrained.get(key)
        if original is None or not torch.equal(original, value.detach().cpu()):
            tensors[key] = value.detach().cpu().to(dtype if value.is_floating_point() else value.dtype)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out)
    out.chmod(0o644)  # the temporary file was private
    record = dict(provenance)
    record.update(
        file=out.name,
        tensors=len(tensors),
        parameters=int(sum(v.numel() for v in tensors.values())),
        bytes=out.stat().st_size,
        dtype=str(dtype).replace("torch.", ""),
        exported=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        machine=f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
        torch=torch.__version__,
    )
    provenance_path(out).write_text(json.dumps(record, indent=2) + "\n")
    return out
