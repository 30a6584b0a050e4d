"""The panel's model choice: registry entries with their state, a local checkpoint file, download progress.

The registry (``medsam2.models``) is read only once the engine's packages are installed (importing it imports
PyTorch); before that only the offline default is offered, so the panel opens on a Slicer without PyTorch.
"""

from __future__ import annotations

import os
from pathlib import Path

from .dependencies import missing_requirements, torch_available

DEFAULT_MODEL = "medsam2-lite"
GPU_MODEL = "MedSAM2_latest"  # proposed, after one confirmation, where a CUDA GPU is there
LOCAL_FILE = "<local file>"  # the entry for a checkpoint chosen on disk
IMAGE_SIZES = range(64, 2049, 32)  # input sizes a Hiera model can run at (multiples of its 32 px stride)
CACHE_ENV = "MEDSAM2_CACHE"  # medsam2.models.CACHE_ENV, readable without importing the engine


def engine_importable() -> bool:
    return torch_available() and not missing_requirements()


def choices() -> list[tuple[str, str]]:
    """``(name, label)`` of every registered model, e.g. ``("sam2.1_hiera_tiny", "sam2.1_hiera_tiny  (149
    MiB, Apache-2.0)")``; only the offline default while the engine cannot be imported yet."""
    if not engine_importable():
        return [(DEFAULT_MODEL, DEFAULT_MODEL)]
    from medsam2 import models

    labels = []
    for row in models.list_models():
        facts = ", ".join(fact for fact in (row.size, row.licence) if fact != "?")
        labels.append((row.name, f"{row.name}  ({facts})"))
    return labels


def models_folder() -> Path:
    """Where downloaded checkpoints are kept (``medsam2.models.cache_dir``)."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "medsam2"


def source(name: str, path: str) -> str:
    """What to load: the registry ``name``, or ``path`` when the local-file entry is chosen."""
    if name != LOCAL_FILE:
        return name
    if not path or not Path(path).is_file():
        raise ValueError("Choose an existing checkpoint file (.pt, .pth or .safetensors).")
    return path


def status(name: str, path: str) -> str:
    """One line on whether the chosen model is ready, will be downloaded, or is missing (and how to get it)."""
    if name == LOCAL_FILE:
        return "file found" if path and Path(path).is_file() else "choose a checkpoint file"
    if not engine_importable():
        return "packages are installed on first use"
    from medsam2 import models

    if not models.is_registered(name):
        return f"unknown model {name!r}"
    entry = models.get(name)
    if models.local_path(entry) is not None:
        return f"ready ({entry.licence})"
    if entry.url is None:
        return f"not available offline. {entry.obtain_hint}"
    return f"downloaded on first use ({models.format_size(entry.size_bytes)}, {entry.licence})"


def download_progress(name: str) -> float | None:
    """Fraction of ``name``'s download so far; -1.0 when its size is unknown; None when none is under way."""
    if name == LOCAL_FILE or not engine_importable():
        return None
    from medsam2 import models

    if not models.is_registered(name):
        return None
    entry = models.get(name)
    partial = models.cache_dir() / (entry.filename + ".partial")
    if entry.url is None or not partial.is_file():
        return None
    if not entry.size_bytes:
        return -1.0
    return min(partial.stat().st_size / entry.size_bytes, 1.0)


def proposed_model(cuda_available: bool) -> str:
    """The model to propose: the recommended MedSAM2 release with a CUDA GPU, the offline default without."""
    return GPU_MODEL if cuda_available and engine_importable() else DEFAULT_MODEL


def download_question(name: str) -> str | None:
    """The one confirmation asked before ``name`` is downloaded (size, licence, source); ``None`` when nothing
    needs downloading (cached, offline, or not a registered name)."""
    if name == LOCAL_FILE or not engine_importable():
        return None
    from medsam2 import models

    if not models.is_registered(name):
        return None
    entry = models.get(name)
    if entry.url is None or models.local_path(entry) is not None:
        return None
    check = (
        "verified against its published sha256" if entry.verified else "not verifiable (no published digest)"
    )
    return (
        f"Download {entry.name} ({entry.terms()})?\n\n{entry.description}\nFrom {entry.url}, {check}.\n"
        f"Licence terms: {entry.homepage}\nIt is kept in {models_folder()}."
    )


def parse_image_size(text: str) -> int | None:
    """The image-size field next to *Local file...*: empty means "from the file", else a multiple of 32."""
    text = text.strip()
    if not text:
        return None
    if not text.isdigit() or int(text) not in IMAGE_SIZES:
        raise ValueError(
            f"Image size {text!r}: give the size the checkpoint was trained at, a multiple of 32 from "
            f"{IMAGE_SIZES.start} to {IMAGE_SIZES.stop - 1} (MedSAM2 files: 512; SAM 2: 1024), or leave it empty."
        )
    return int(text)


def local_file_status(path: str, image_size: int | None) -> str:
    """What the panel says about a chosen file: a registered checkpoint (recognised by its sha256) and the
    size it runs at, or the size that will be used for an unknown file."""
    if not path or not Path(path).is_file():
        return "choose a checkpoint file"
    if not engine_importable():
        return "file found"
    from medsam2 import models

    entry = models.identify(path)
    if entry is not None:
        size = image_size or entry.image_size
        return f"recognised: {entry.name} ({entry.licence}), runs at {size} px"
    if image_size is None:
        return "not a registered checkpoint: set its image size (MedSAM2 files: 512), else 1024 is guessed"
    return f"not a registered checkpoint, runs at {image_size} px"
