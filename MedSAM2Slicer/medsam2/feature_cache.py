"""Image-encoder features kept between runs, so that a correction or a second object on the same volume does
not encode its slices again.

A slice's features depend only on the model and on the slice's intensities as the model is given them, so a
key names those: the model (a token per loaded model object), a digest of the prepared intensities (after the
window), the axis and the slice index. Entries are dropped least recently used first once their tensors
together exceed ``max_bytes`` (counted where they live: GPU memory for a CUDA model).
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import weakref
from collections import OrderedDict
from collections.abc import Hashable

import numpy as np

from .model.sam2 import ImageFeatures, SAM2Model


class FeatureCache:
    """A thread-safe LRU of :class:`ImageFeatures` under a byte limit, shared by runs (e.g. a server's jobs)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[Hashable, ImageFeatures] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()
        self._tokens: weakref.WeakKeyDictionary[SAM2Model, int] = weakref.WeakKeyDictionary()
        self._next_token = itertools.count(1)
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> ImageFeatures | None:
        with self._lock:
            features = self._entries.get(key)
            if features is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return features

    def put(self, key: Hashable, features: ImageFeatures) -> None:
        size = features.nbytes
        with self._lock:
            if size > self.max_bytes:
                return
            old = self._entries.pop(key, None)
            if old is not None:
                self._nbytes -= old.nbytes
            self._entries[key] = features
            self._nbytes += size
            while self._nbytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._nbytes -= dropped.nbytes

    def scope(self, model: SAM2Model, intensities: np.ndarray) -> tuple[int, str]:
        """The part of a key shared by every slice of ``intensities`` ``[Z, Y, X]`` as ``model`` sees them.

        A model object gets a token of its own for as long as it lives: two loads of the same checkpoint do
        not share entries (they may differ in device or dtype), and a freed model's entries are never hit.
        """
        with self._lock:
            token = self._tokens.get(model)
            if token is None:
                token = self._tokens[model] = next(self._next_token)
        return token, intensities_digest(intensities)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._nbytes = 0

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self._nbytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
            }


def intensities_digest(intensities: np.ndarray) -> str:
    """A digest of an array's dtype, shape and values."""
    array = np.ascontiguousarray(intensities)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()
