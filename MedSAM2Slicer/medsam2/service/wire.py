"""The engine service's wire format, shared by the server and its clients (numpy and the standard library).

- An array travels as its raw C-order bytes, zlib-compressed, with its dtype and shape beside it. Uploaded
  arrays (volumes, images) are named by :func:`array_digest`, a SHA-256 of dtype, shape and bytes: the same
  volume uploaded twice gets the same name and is stored once.
- Inside JSON (mask prompts, results), an array is ``{"dtype", "shape", "data"}`` with ``data`` the base64 of
  the compressed bytes; a boolean array is bit-packed first.
- Prompts are ``medsam2.Prompt`` fields; a mask prompt's mask is such an array.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from collections.abc import Sequence

import numpy as np

from ..errors import InputError
from ..prompts import Prompt

# Array dtypes accepted on the wire: what medical images and masks are stored as.
ARRAY_DTYPES = frozenset(
    ["bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "float16", "float32", "float64"]
)
# zlib level 1: on CT volumes nearly the ratio of level 6 at several times the speed.
_COMPRESSION_LEVEL = 1


def array_digest(array: np.ndarray) -> str:
    """The SHA-256 (hex) of the array's dtype name, shape and C-order bytes."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.name}|{','.join(map(str, array.shape))}|".encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def compress_array(array: np.ndarray) -> bytes:
    return zlib.compress(memoryview(np.ascontiguousarray(array)).cast("B"), _COMPRESSION_LEVEL)


def decompress_array(data: bytes, dtype: str, shape: Sequence[int], max_bytes: int) -> np.ndarray:
    """The array that :func:`compress_array` made; refuses a body that would expand past ``max_bytes``."""
    dtype_ = checked_dtype(dtype)
    shape = checked_shape(shape)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype_.itemsize
    if expected > max_bytes:
        raise InputError(f"The array would take {expected} bytes; this server accepts at most {max_bytes}")
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(data, expected + 1)
    except zlib.error as error:
        raise InputError(f"The array data are not zlib-compressed: {error}") from None
    if len(raw) != expected or inflater.unconsumed_tail or not inflater.eof:
        raise InputError(
            f"The array data do not hold a {dtype_.name} array of shape {tuple(shape)} ({expected} bytes)"
        )
    return np.frombuffer(raw, dtype=dtype_).reshape(shape)


def checked_dtype(dtype: str) -> np.dtype:
    if dtype not in ARRAY_DTYPES:
        raise InputError(f"dtype must be one of {', '.join(sorted(ARRAY_DTYPES))}; got {dtype!r}")
    return np.dtype(dtype)


def checked_shape(shape: Sequence[int]) -> tuple[int, ...]:
    try:
        values = tuple(int(n) for n in shape)
    except (TypeError, ValueError):
        raise InputError(f"shape must be a list of sizes, got {shape!r}") from None
    if not 1 <= len(values) <= 4 or any(n < 1 for n in values):
        raise InputError(f"shape must be 1 to 4 positive sizes, got {shape!r}")
    return values


def encode_array(array: np.ndarray) -> dict:
    """An array as a JSON object (booleans bit-packed)."""
    array = np.asarray(array)
    data = np.packbits(array.ravel()) if array.dtype == bool else array
    return {
        "dtype": array.dtype.name,
        "shape": list(array.shape),
        "data": base64.b64encode(compress_array(data)).decode("ascii"),
    }


def decode_array(value: dict, max_bytes: int) -> np.ndarray:
    """The array of :func:`encode_array`; a malformed value raises ``InputError``."""
    if not isinstance(value, dict) or not {"dtype", "shape", "data"} <= value.keys():
        raise InputError('An array must be an object with "dtype", "shape" and "data"')
    try:
        data = base64.b64decode(value["data"], validate=True)
    except (ValueError, TypeError):
        raise InputError("An array's data must be base64") from None
    shape = checked_shape(value["shape"])
    if value["dtype"] != "bool":
        return decompress_array(data, value["dtype"], shape, max_bytes)
    count = int(np.prod(shape, dtype=np.int64))
    packed = decompress_array(data, "uint8", ((count + 7) // 8,), max_bytes)
    return np.unpackbits(packed, count=count).astype(bool).reshape(shape)


def encode_prompt(prompt: Prompt) -> dict:
    fields: dict = {"axis": int(prompt.axis), "index": int(prompt.index), "obj_id": int(prompt.obj_id)}
    if prompt.points is not None:
        fields["points"] = np.asarray(prompt.points, dtype=float).tolist()
        fields["labels"] = None if prompt.labels is None else [int(v) for v in prompt.labels]
    if prompt.box is not None:
        fields["box"] = np.asarray(prompt.box, dtype=float).tolist()
    if prompt.mask is not None:
        fields["mask"] = encode_array(np.asarray(prompt.mask, dtype=bool))
    if prompt.absent:
        fields["absent"] = True
    return fields


def decode_prompt(fields: dict, max_bytes: int) -> Prompt:
    """A :class:`Prompt` from its JSON fields; unknown or malformed fields raise ``InputError``."""
    if not isinstance(fields, dict):
        raise InputError(f"A prompt must be an object, got {type(fields).__name__}")
    unknown = set(fields) - {"axis", "index", "obj_id", "points", "labels", "box", "mask", "absent"}
    if unknown:
        raise InputError(f"Unknown prompt fields: {', '.join(sorted(unknown))}")
    mask = fields.get("mask")
    try:
        return Prompt(
            axis=fields.get("axis", 0),
            index=fields.get("index", 0),
            obj_id=fields.get("obj_id", 1),
            points=fields.get("points"),
            labels=fields.get("labels"),
            box=fields.get("box"),
            mask=None if mask is None else decode_array(mask, max_bytes),
            absent=_flag(fields.get("absent", False), "absent"),
        )
    except InputError:
        raise
    except (TypeError, ValueError) as error:
        raise InputError(f"Malformed prompt {_short(fields)}: {error}") from None


def _flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"The prompt field {name!r} must be true or false, got {_short(value)}")
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."
