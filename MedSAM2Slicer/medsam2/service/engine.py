"""The engine behind the HTTP layer: requests checked and turned into jobs, models, caches and limits.

Everything a request says is checked when it is submitted, so that a bad field is answered at once with a
clear message (a 4xx), not as a failed job later: the arrays and checkpoint it names must be here, the model
registered, the device available, every prompt inside its volume, every option one that ``segment_volume``
knows. What only the run can find out (e.g. a checkpoint that does not fit its preset) fails the job with
the engine's message.
"""

from __future__ import annotations

import json
import platform
import threading
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .. import __version__, models
from ..errors import InputError
from ..feature_cache import FeatureCache
from ..images import segment_images
from ..load import resolve_device
from ..memory import MemoryOptions
from ..preprocess import MODALITIES, WINDOW_PRESETS
from ..volume import Aggregation, VolumeResult, segment_volume
from .jobs import Job, JobContext, JobQueue
from .store import ArrayStore, CheckpointStore, ModelKey, ModelPool, NotFound, model_config
from .wire import decode_array, decode_prompt, encode_array

# segment_volume's keyword options that a request may set, with the JSON types each accepts.
VOLUME_OPTIONS = {
    "modality": (str,),
    "window": (str, list, type(None)),
    "orientations": (int,),
    "aggregate": (str,),
    "roi": (str, type(None)),
    "seed": (int,),
    "early_stop": (bool,),
    "memory": (dict,),
    "pipeline": (str,),
}
DTYPES = (None, "float32", "bfloat16", "float16")
MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """How much one server accepts and keeps; over a limit, a request gets a 4xx saying which."""

    max_request_bytes: int = 2048 * MiB  # one HTTP body, compressed as sent
    max_array_bytes: int = 4096 * MiB  # one array, uncompressed
    max_queued: int = 16  # jobs waiting, all devices together
    array_store_bytes: int = 8192 * MiB  # uploaded arrays kept in memory
    feature_cache_bytes: int = 2048 * MiB  # image features kept per device
    checkpoint_bytes: int = 4096 * MiB  # one uploaded checkpoint
    max_models: int = 2  # models kept loaded, the most recently used


class ServiceEngine:
    """Holds the server's state; the HTTP layer (:mod:`medsam2.service.app`) only translates to and from it."""

    def __init__(self, cache_dir: Path, limits: Limits = Limits()) -> None:
        self.cache_dir = cache_dir
        self.limits = limits
        self.arrays = ArrayStore(limits.array_store_bytes)
        self.checkpoints = CheckpointStore(cache_dir / "uploads", limits.checkpoint_bytes)
        self.models = ModelPool(self.checkpoints, limits.max_models)
        self.queue = JobQueue(limits.max_queued)
        self._features: dict[str, FeatureCache] = {}
        self._lock = threading.Lock()
        self.frames_encoded = 0

    # -- requests -> jobs ------------------------------------------------------------------------------------

    def submit_volume(self, request: dict) -> Job:
        """A ``segment_volume`` job: ``volume`` (digest), ``prompts``, ``spacing``, ``options``, the model."""
        volume = self.arrays.get(request["volume"])
        if volume.ndim != 3:
            raise InputError(f"The array {request['volume']} is not a volume: its shape is {volume.shape}")
        prompts = [decode_prompt(p, self.limits.max_array_bytes) for p in request["prompts"]]
        if not prompts:
            raise InputError("A volume job needs at least one prompt")
        for prompt in prompts:
            prompt.check_fits(volume.shape)
        spacing = request.get("spacing")
        if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
            raise InputError(f"spacing must be three positive numbers (z, y, x in mm), got {spacing}")
        options = self._volume_options(request.get("options") or {})
        key = self._model_key(request)
        with_probabilities = bool(request.get("return_probabilities", False))

        def work(context: JobContext) -> dict:
            model = self._load(key, context)
            result = segment_volume(
                model,
                volume,
                prompts,
                spacing=spacing,
                progress=context.progress,
                cancel=context.cancel,
                feature_cache=self._feature_cache(key.device),
                **options,
            )
            with self._lock:
                self.frames_encoded += result.frames_encoded
            return encode_volume_result(result, with_probabilities)

        summary = f"volume {volume.shape} with {key.label}"
        return self.queue.submit(Job(device=key.device, work=work, summary=summary))

    def submit_images(self, request: dict) -> Job:
        """A ``segment_images`` job: ``images`` (digests), ``template`` and its prompt, the model."""
        images = [self.arrays.get(digest) for digest in request["images"]]
        if not images:
            raise InputError("An images job needs at least one image")
        template = int(request.get("template", 0))
        if not 0 <= template < len(images):
            raise InputError(f"template index {template} is outside the {len(images)} images")
        mask = request.get("mask")
        prompt = {
            "points": request.get("points"),
            "labels": request.get("labels"),
            "box": request.get("box"),
            "mask": None if mask is None else decode_array(mask, self.limits.max_array_bytes),
        }
        memory = _memory_options(request.get("memory") or {})
        key = self._model_key(request)

        def work(context: JobContext) -> dict:
            model = self._load(key, context)
            masks = segment_images(
                model,
                images,
                template,
                memory=memory,
                seed=int(request.get("seed", 0)),
                progress=context.progress,
                cancel=context.cancel,
                **prompt,
            )
            return {"masks": [encode_array(m) for m in masks]}

        summary = f"{len(images)} images with {key.label}"
        return self.queue.submit(Job(device=key.device, work=work, summary=summary))

    def _model_key(self, request: dict) -> ModelKey:
        name, checkpoint = request.get("model"), request.get("checkpoint")
        if (name is None) == (checkpoint is None):
            raise InputError('Name either a registered "model" or an uploaded "checkpoint" (its SHA-256)')
        if name is not None and not models.is_registered(name):
            raise NotFound(f"Unknown model {name!r}; this server knows: {', '.join(models.names())}")
        if checkpoint is not None:
            self.checkpoints.path(checkpoint)
        dtype = request.get("dtype")
        if dtype not in DTYPES:
            raise InputError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        config = request.get("config")
        if isinstance(config, dict):
            config = json.dumps(model_config(config).__dict__, sort_keys=True)
        elif config is not None and not isinstance(config, str):
            raise InputError(
                f"config must be a preset name or an object of ModelConfig fields, got {config!r}"
            )
        image_size = request.get("image_size")
        if image_size is not None and not (isinstance(image_size, int) and 64 <= image_size <= 4096):
            raise InputError(f"image_size must be an integer from 64 to 4096, got {image_size!r}")
        return ModelKey(
            model=name,
            checkpoint=checkpoint,
            device=device_name(request.get("device", "auto")),
            dtype=dtype,
            config=config,
            image_size=image_size,
        )

    def _volume_options(self, options: dict) -> dict:
        unknown = set(options) - set(VOLUME_OPTIONS)
        if unknown:
            known = ", ".join(VOLUME_OPTIONS)
            raise InputError(f"Unknown options: {', '.join(sorted(unknown))}; known: {known}")
        for name, value in options.items():
            if not isinstance(value, VOLUME_OPTIONS[name]) or (
                name != "early_stop" and isinstance(value, bool)
            ):
                raise InputError(f"Option {name!r} has the wrong type: {value!r}")
        checked = dict(options)
        for name, allowed in (
            ("orientations", (1, 2, 6)),
            ("aggregate", tuple(a.value for a in Aggregation)),
            ("roi", ("auto", None)),
            ("modality", MODALITIES),
            ("pipeline", ("default", "upstream")),
        ):
            if name in checked and checked[name] not in allowed:
                raise InputError(
                    f"{name} must be one of {', '.join(map(str, allowed))}; got {checked[name]!r}"
                )
        if isinstance(checked.get("window"), str) and checked["window"] not in WINDOW_PRESETS:
            raise InputError(f"Unknown window {checked['window']!r}; presets: {', '.join(WINDOW_PRESETS)}")
        if isinstance(checked.get("window"), list):
            window = checked["window"]
            if len(window) != 2 or not all(isinstance(v, (int, float)) for v in window):
                raise InputError(f"A window is a preset name or [level, width], got {window!r}")
            checked["window"] = (float(window[0]), float(window[1]))
        if "memory" in checked:
            checked["memory"] = _memory_options(checked["memory"])
        return checked

    # -- running --------------------------------------------------------------------------------------------

    def _load(self, key: ModelKey, context: JobContext):
        context.progress(0, 0, f"loading {key.label}")
        if key.model is not None:
            context.detail = lambda: download_status(key.model)
        try:
            return self.models.get(key)
        finally:
            context.detail = None

    def _feature_cache(self, device: str) -> FeatureCache:
        with self._lock:
            cache = self._features.get(device)
            if cache is None:
                cache = self._features[device] = FeatureCache(self.limits.feature_cache_bytes)
            return cache

    # -- facts ------------------------------------------------------------------------------------------------

    def info(self) -> dict:
        with self._lock:
            features = {device: cache.stats() for device, cache in self._features.items()}
        return {
            "version": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "devices": available_devices(),
            "models": [
                {"name": row.name, "size": row.size, "licence": row.licence, "cached": row.cached}
                for row in models.list_models()
            ],
            "loaded_models": self.models.loaded(),
            "jobs": self.queue.stats(),
            "frames_encoded": self.frames_encoded,
            "feature_cache": features,
            "arrays": self.arrays.stats(),
            "limits": {f.name: getattr(self.limits, f.name) for f in fields(self.limits)},
        }


def encode_volume_result(result: VolumeResult, with_probabilities: bool) -> dict:
    encoded = {
        "labels": encode_array(result.labels),
        "frames_encoded": result.frames_encoded,
        "frames_visited": result.frames_visited,
        "timings": result.timings,
        "window": None if result.window is None else list(result.window),
    }
    if with_probabilities:
        encoded["probabilities"] = {str(k): encode_array(v) for k, v in result.probabilities.items()}
    return encoded


def device_name(device: str) -> str:
    """The queue a device's jobs wait in: ``cpu``, ``cuda:0``, ``mps``; an unavailable one is refused."""
    if not isinstance(device, str):
        raise InputError(f"device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
    try:
        resolved = resolve_device(device)
    except Exception as error:
        raise InputError(str(error)) from None
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return str(resolved)


def available_devices() -> list[dict]:
    devices = [{"name": "cpu", "description": platform.processor() or platform.machine()}]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            devices.append(
                {
                    "name": f"cuda:{index}",
                    "description": properties.name,
                    "memory_bytes": properties.total_memory,
                }
            )
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append({"name": "mps", "description": "Apple MPS"})
    return devices


def download_status(name: str) -> dict:
    """``{"download": {"bytes", "total"}}`` while registry model ``name`` is being downloaded, else ``{}``."""
    entry = models.get(name)
    if entry.url is None or models.local_path(entry) is not None:
        return {}
    partial = models.cache_dir() / (entry.filename + ".partial")
    done = partial.stat().st_size if partial.is_file() else 0
    return {"download": {"model": name, "bytes": done, "total": entry.size_bytes}}


def _memory_options(fields_: dict) -> MemoryOptions:
    try:
        return MemoryOptions(**fields_)
    except TypeError as error:
        raise InputError(f"Unknown memory option: {error}") from None
