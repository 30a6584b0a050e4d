"""What the engine service keeps between requests: uploaded arrays, uploaded checkpoints, loaded models.

Nothing here takes a path from a request. Arrays live in memory under their content digest; checkpoints are
written only inside the server's cache folder, under their SHA-256, through a temporary file renamed into
place once its digest is checked; models are loaded from registry names or those checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..configs import ModelConfig
from ..errors import InputError
from .wire import array_digest

_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")


class NotFound(InputError):
    """A request names an array, checkpoint, model or job that the server does not have."""


def checked_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _HEX_DIGEST.fullmatch(digest):
        raise InputError(f"A digest is 64 lowercase hex digits (SHA-256), got {digest!r}")
    return digest


class ArrayStore:
    """Uploaded arrays by digest, dropped least recently used first past ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._arrays: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, digest: str, array: np.ndarray) -> bool:
        """Keep ``array`` under ``digest`` (checked against its content); False if it was already there."""
        checked_digest(digest)
        actual = array_digest(array)
        if actual != digest:
            raise InputError(f"The uploaded array's digest is {actual}, not {digest}: the upload was damaged")
        if array.nbytes > self.max_bytes:
            raise InputError(
                f"The array takes {array.nbytes} bytes; this server keeps at most {self.max_bytes}"
            )
        array.flags.writeable = False  # shared by every job that names it
        with self._lock:
            known = digest in self._arrays
            self._arrays[digest] = array
            self._arrays.move_to_end(digest)
            while sum(a.nbytes for a in self._arrays.values()) > self.max_bytes:
                self._arrays.popitem(last=False)
        return not known

    def get(self, digest: str) -> np.ndarray:
        with self._lock:
            array = self._arrays.get(checked_digest(digest))
            if array is None:
                raise NotFound(f"No array {digest} on this server: upload it first (PUT /v1/arrays/{digest})")
            self._arrays.move_to_end(digest)
            return array

    def __contains__(self, digest: str) -> bool:
        with self._lock:
            return digest in self._arrays

    def stats(self) -> dict:
        with self._lock:
            used = sum(a.nbytes for a in self._arrays.values())
            return {"arrays": len(self._arrays), "bytes": used, "max_bytes": self.max_bytes}


class CheckpointStore:
    """Checkpoint files uploaded by clients, as ``<folder>/<sha256><suffix>``."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in folder.glob("*.partial"):  # an upload cut off when the server last stopped
            leftover.unlink(missing_ok=True)

    def find(self, digest: str) -> Path | None:
        checked_digest(digest)
        return next((p for s in CHECKPOINT_SUFFIXES if (p := self.folder / f"{digest}{s}").is_file()), None)

    def path(self, digest: str) -> Path:
        path = self.find(digest)
        if path is None:
            raise NotFound(
                f"No checkpoint {digest} on this server: upload it first (PUT /v1/checkpoints/...)"
            )
        return path

    def add(self, digest: str, suffix: str, chunks: Iterable[bytes]) -> bool:
        """Write the uploaded ``chunks`` as checkpoint ``digest``; False if it was already there."""
        checked_digest(digest)
        if suffix not in CHECKPOINT_SUFFIXES:
            raise InputError(f"A checkpoint's suffix must be one of {', '.join(CHECKPOINT_SUFFIXES)}")
        if self.find(digest) is not None:
            for _ in chunks:  # the body must still be read
                pass
            return False
        sha, size = hashlib.sha256(), 0
        handle, partial = tempfile.mkstemp(dir=self.folder, suffix=".partial")
        try:
            with os.fdopen(handle, "wb") as file:
                for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise InputError(
                            f"The checkpoint is larger than this server's {self.max_bytes} bytes"
                        )
                    sha.update(chunk)
                    file.write(chunk)
            if sha.hexdigest() != digest:
                raise InputError(f"The uploaded checkpoint's SHA-256 is {sha.hexdigest()}, not {digest}")
            os.replace(partial, self.folder / f"{digest}{suffix}")
        finally:
            Path(partial).unlink(missing_ok=True)
        return True


@dataclass(frozen=True)
class ModelKey:
    """What makes a loaded model: its source (registry name or uploaded checkpoint), device and options.
    ``config`` is a preset name or a ``ModelConfig``'s fields as sorted JSON."""

    model: str | None
    checkpoint: str | None
    device: str
    dtype: str | None
    config: str | None
    image_size: int | None

    @property
    def label(self) -> str:
        name = self.model or f"checkpoint {self.checkpoint[:12]}"
        size = f" at {self.image_size} px" if self.image_size else ""
        return f"{name}{size} on {self.device}" + (f" ({self.dtype})" if self.dtype else "")


class ModelPool:
    """Models loaded on first use, one per :class:`ModelKey`; the ``capacity`` most recently used are kept.

    A clinician who tries several models in a session must not fill the GPU with all of them. An evicted model
    stays alive for the jobs still holding it and is freed when they finish; the next request for it loads it
    again.
    """

    def __init__(self, checkpoints: CheckpointStore, capacity: int = 2) -> None:
        if capacity < 1:
            raise ValueError(f"A model pool keeps at least one model, got capacity {capacity}")
        self.checkpoints = checkpoints
        self.capacity = capacity
        self._models: OrderedDict[ModelKey, object] = OrderedDict()
        self._locks: dict[ModelKey, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, key: ModelKey):
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            with self._lock:
                model = self._models.get(key)
                if model is not None:
                    self._models.move_to_end(key)
                    return model
            model = self._load(key)
            with self._lock:
                self._models[key] = model
                evicted = [
                    self._models.popitem(last=False)[0] for _ in range(len(self._models) - self.capacity)
                ]
            if any(k.device.startswith("cuda") for k in evicted):
                _release_cuda_memory()
            return model

    def _load(self, key: ModelKey):
        from ..load import load_model

        source = key.model if key.model is not None else self.checkpoints.path(key.checkpoint)
        config = key.config
        if config is not None and config.startswith("{"):
            config = model_config(json.loads(config))
        return load_model(
            source, config=config, image_size=key.image_size, device=key.device, dtype=key.dtype
        )

    def loaded(self) -> list[str]:
        """Labels of the models kept, least recently used first."""
        with self._lock:
            return [key.label for key in self._models]


def _release_cuda_memory() -> None:
    """Give the CUDA caching allocator's free blocks back, so that an evicted model's memory is usable by other
    processes too (it is reused by this one in any case)."""
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()


def model_config(fields: dict) -> ModelConfig:
    """A ``ModelConfig`` from its fields as JSON gives them (tuples as lists)."""
    try:
        return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    except TypeError as error:
        raise InputError(f"Unknown model config field: {error}") from None
