"""First-use installation of the engine's Python packages inside Slicer.

PyTorch comes from the PyTorch extension (``PyTorchUtils``), which picks the build that matches the computer's
GPU driver; the few pure packages the engine needs besides (``REQUIREMENTS``) are installed with Slicer's pip
after one confirmation. Packages that Slicer ships itself (``PROTECTED``) are never replaced: they are pinned
to the installed versions with a pip constraints file, so pip picks versions of the new packages that work
with them, or fails, rather than upgrading numpy, SimpleITK or vtk under Slicer.

Checking (``missing_requirements``) imports nothing; only ``ensure`` and ``ensure_torch`` need the
Slicer application (dialogs, pip, the PyTorch extension).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shlex
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass

MINIMUM_TORCH = "2.1"
# Slicer's own packages: pinned while installing, never upgraded.
PROTECTED = ("numpy", "scipy", "SimpleITK", "vtk", "torch")


@dataclass(frozen=True)
class Requirement:
    """A package the engine imports as ``module`` and pip installs as ``specifier``."""

    module: str
    specifier: str


REQUIREMENTS = (
    Requirement("safetensors", "safetensors>=0.4"),
    Requirement("tqdm", "tqdm>=4.60"),
    Requirement("skimage", "scikit-image>=0.20"),
    Requirement("scipy", "scipy>=1.9"),  # shipped with Slicer; installed only where a build lacks it
    # The engine server that Slicer starts as its child process (medsam2 serve).
    Requirement("fastapi", "fastapi>=0.110"),
    Requirement("uvicorn", "uvicorn>=0.29"),
)

CPU_NOTE = (
    "No CUDA or Apple MPS GPU is available to PyTorch, so MedSAM2 runs on the CPU. That works, but each slice "
    "takes seconds instead of milliseconds: a 6-orientation run over a 100-slice volume can take many minutes. "
    "For quicker results set Options > Orientations to 1 or 2, or use a computer with an NVIDIA GPU (and "
    "install the CUDA build of PyTorch with the PyTorch Utils module)."
)


class DependencyError(RuntimeError):
    """A package could not be installed, or the user declined installing it."""


def missing_requirements(
    requirements: Iterable[Requirement] = REQUIREMENTS,
    find_spec: Callable[[str], object] = importlib.util.find_spec,
) -> list[Requirement]:
    """The requirements whose module cannot be found (nothing is imported)."""
    return [r for r in requirements if find_spec(r.module) is None]


def torch_available(find_spec: Callable[[str], object] = importlib.util.find_spec) -> bool:
    return find_spec("torch") is not None


def constraints(
    packages: Iterable[str] = PROTECTED,
    version: Callable[[str], str] = importlib.metadata.version,
) -> str:
    """pip constraints text pinning every installed package of ``packages`` to its installed version.

    Packages that pip does not know about (Slicer builds vtk itself, so it has no distribution metadata) are
    left out: pip cannot replace what it does not see as installed... but it could install a second copy,
    which no requirement here asks for.
    """
    lines = []
    for name in packages:
        try:
            lines.append(f"{name}=={version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return "\n".join(lines) + ("\n" if lines else "")


def pip_arguments(requirements: Iterable[Requirement], constraints_file: str) -> str:
    """The argument string for ``slicer.util.pip_install``: the specifiers and ``-c <constraints file>``."""
    specifiers = [shlex.quote(r.specifier) for r in requirements]
    return " ".join([*specifiers, "-c", shlex.quote(constraints_file)])


def ensure_torch():
    """Import PyTorch, installing it through the PyTorch extension first when needed (GUI thread)."""
    if torch_available():
        import torch

        return torch
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        raise DependencyError(
            "MedSAM2 needs PyTorch. Install the 'PyTorch' extension from the Extensions Manager, restart "
            "Slicer, and try again."
        ) from None
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
        askConfirmation=True, torchVersionRequirement=f">={MINIMUM_TORCH}"
    )
    if torch is None:
        raise DependencyError("PyTorch was not installed, so MedSAM2 cannot run.")
    return torch


def ensure(confirm: Callable[[str], bool] | None = None, install: Callable[[str], object] | None = None):
    """Make sure PyTorch and ``REQUIREMENTS`` are importable; returns the ``torch`` module (GUI thread).

    The missing pip packages are listed in one confirmation dialog (``confirm``, default Slicer's OK/Cancel
    dialog) and installed together (``install``, default ``slicer.util.pip_install``). Raises
    ``DependencyError`` when the user declines or an install fails.
    """
    torch = ensure_torch()
    missing = missing_requirements()
    if not missing:
        return torch
    import slicer

    confirm = confirm or (lambda text: slicer.util.confirmOkCancelDisplay(text, "MedSAM2: install packages"))
    install = install or slicer.util.pip_install
    names = ", ".join(r.specifier for r in missing)
    if not confirm(
        f"MedSAM2 needs these Python packages: {names}.\n\nThey will be downloaded and installed into "
        "Slicer's Python now (a few MB, takes about a minute). Slicer's own numpy, SimpleITK and vtk are "
        "kept as they are."
    ):
        raise DependencyError(f"Installation of {names} was declined; MedSAM2 cannot run without them.")
    handle, path = tempfile.mkstemp(prefix="medsam2-constraints-", suffix=".txt")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(constraints())
        install(pip_arguments(missing, path))
    except Exception as error:
        raise DependencyError(
            f"Installing {names} failed: {error}. See the Python console for pip's output; you can also run "
            f"slicer.util.pip_install('{' '.join(r.specifier for r in missing)}') there."
        ) from error
    finally:
        os.unlink(path)
    importlib.invalidate_caches()
    still_missing = missing_requirements(missing)
    if still_missing:
        raise DependencyError(
            "pip finished but these modules still cannot be imported: "
            + ", ".join(r.module for r in still_missing)
            + ". Restart Slicer and try again."
        )
    return torch


def device_note(torch, device: str) -> str:
    """A warning for the status line when ``device`` will run on the CPU for lack of a GPU; else ''."""
    if device not in ("auto", "cpu"):
        return ""
    mps = getattr(torch.backends, "mps", None)
    has_gpu = torch.cuda.is_available() or (mps is not None and mps.is_available())
    if has_gpu:
        return ""
    return CPU_NOTE
