"""``medsam2 bench``: what the orientations, the ROI and the early stop cost, for one model and one volume.

Four runs of ``segment_volume`` in one process, on the same prompts:

- (a) the prompt axis, one direction (``orientations=1``);
- (b) the prompt axis, both directions (``orientations=2``);
- (c) six orientations over every slice (``roi=None``, early stop off): the reference;
- (d) six orientations with the defaults (``roi="auto"``, early stop on).

Each run is set against its floor: the time ``model.encode_image`` alone takes for as many frames as the run
encoded (a box-tracking model does not encode the frames where it has lost every object). Times are
wall-clock seconds (CUDA is synchronised before each reading); ratios against run (c) and against the floor
carry over between machines better than the seconds do.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .frames import FrameStack
from .memory import MemoryOptions
from .metrics import dice
from .model.sam2 import SAM2Model
from .preprocess import prepare_intensities
from .prompts import Prompt
from .volume import ProgressCallback, segment_volume


@dataclass(frozen=True)
class Case:
    key: str
    description: str
    orientations: int
    roi: str | None
    early_stop: bool


CASES = (
    Case("a", "prompt axis, one direction", 1, "auto", True),
    Case("b", "prompt axis, both directions", 2, "auto", True),
    Case("c", "6 orientations, whole volume", 6, None, False),
    Case("d", "6 orientations, ROI + early stop", 6, "auto", True),
)
REFERENCE_CASE = "c"
TABLE_COLUMNS = (
    "run",
    "what",
    "frames",
    "encoded",
    "seconds",
    "ms/frame",
    "encoder s",
    "x floor",
    "x (c)",
    "Dice",
)


@dataclass
class Measurement:
    case: Case
    seconds: float
    frames: int
    frames_by_pass: dict[str, int]
    frames_encoded: int = 0
    encoder_seconds: float = float("nan")
    voxels: int = 0
    dice: float | None = None


@dataclass
class BenchReport:
    model: str
    volume: str
    shape: tuple[int, ...]
    image_size: int
    machine: dict[str, object]
    measurements: list[Measurement] = field(default_factory=list)
    date: str = ""

    def _reference_seconds(self) -> float:
        return next(m.seconds for m in self.measurements if m.case.key == REFERENCE_CASE)

    def table_rows(self) -> list[dict[str, str]]:
        """One row per run, keyed by ``TABLE_COLUMNS``, formatted for reading."""
        reference = self._reference_seconds()
        return [
            {
                "run": m.case.key,
                "what": m.case.description,
                "frames": str(m.frames),
                "encoded": str(m.frames_encoded),
                "seconds": f"{m.seconds:.2f}",
                "ms/frame": f"{1000 * m.seconds / max(m.frames, 1):.1f}",
                "encoder s": f"{m.encoder_seconds:.2f}",
                "x floor": f"{m.seconds / m.encoder_seconds:.2f}" if m.encoder_seconds > 0 else "-",
                "x (c)": f"{m.seconds / reference:.2f}",
                "Dice": "-" if m.dice is None else f"{m.dice:.4f}",
            }
            for m in self.measurements
        ]

    def setup_line(self) -> str:
        m = self.machine
        gpu = f", {m['gpu']}" if m.get("gpu") else ""
        return (
            f"{self.model} at {self.image_size} px on {self.volume} {'x'.join(map(str, self.shape))} (Z x Y x X); "
            f"{m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads), torch {m['torch']}, "
            f"device {m['device']}{gpu}"
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "date": self.date,
            "model": self.model,
            "volume": self.volume,
            "shape": list(self.shape),
            "image_size": self.image_size,
            "machine": self.machine,
            "runs": [
                {**asdict(m.case), **{k: v for k, v in asdict(m).items() if k != "case"}}
                for m in self.measurements
            ],
        }

    def markdown(self) -> str:
        """A section for BENCHMARKS.md: the setup, then the table."""
        lines = [f"### {self.date}: {self.model} on {self.volume}", "", self.setup_line(), ""]
        lines.append("| " + " | ".join(TABLE_COLUMNS) + " |")
        lines.append("|" + "|".join("---" for _ in TABLE_COLUMNS) + "|")
        for row in self.table_rows():
            lines.append("| " + " | ".join(row[c] for c in TABLE_COLUMNS) + " |")
        return "\n".join(lines) + "\n"


def run(
    model: SAM2Model,
    volume: np.ndarray,
    prompts: Sequence[Prompt],
    spacing: Sequence[float] | None = None,
    modality: str = "auto",
    window: str | tuple[float, float] | None = None,
    memory: MemoryOptions | None = None,
    seed: int = 0,
    reference: np.ndarray | None = None,
    progress: ProgressCallback | None = None,
    model_name: str = "",
    volume_name: str = "volume",
) -> BenchReport:
    """Time the four cases on ``volume`` ``[Z, Y, X]`` and the encoder floor of each.

    ``reference`` (boolean ``[Z, Y, X]``) adds each run's Dice against it. Run (a) is run once untimed
    first, so that no run pays for first-call set-up. Each run's floor is timed right after it: on a shared
    machine the speed drifts over minutes, and a floor timed at the end compared runs with other speeds.
    """
    memory = memory or MemoryOptions()
    common = dict(spacing=spacing, modality=modality, window=window, memory=memory, seed=seed)
    report = BenchReport(
        model=model_name or model.config.name,
        volume=volume_name,
        shape=tuple(volume.shape),
        image_size=model.image_size,
        machine=machine(model.device),
        date=datetime.date.today().isoformat(),
    )
    intensities = prepare_intensities(volume, modality=modality, window=window)
    segment_volume(model, volume, prompts, orientations=1, **common)  # warm-up
    for case in CASES:
        step = _progress_for(progress, case)
        _synchronize(model.device)
        started = time.perf_counter()
        result = segment_volume(
            model,
            volume,
            prompts,
            orientations=case.orientations,
            roi=case.roi,
            early_stop=case.early_stop,
            progress=step,
            **common,
        )
        _synchronize(model.device)
        seconds = time.perf_counter() - started
        found = result.labels != 0
        report.measurements.append(
            Measurement(
                case=case,
                seconds=seconds,
                frames=sum(result.frames_visited.values()),
                frames_encoded=result.frames_encoded,
                frames_by_pass=dict(result.frames_visited),
                encoder_seconds=encoder_seconds(model, intensities, result.frames_encoded),
                voxels=int(found.sum()),
                dice=None if reference is None else dice(found, reference),
            )
        )
    return report


def encoder_seconds(model: SAM2Model, intensities: np.ndarray, count: int) -> float:
    """Seconds ``model.encode_image`` takes for ``count`` frames.

    The frames are the volume's axial slices in turn (every frame is resized to the model's input size,
    so the cost does not depend on which slices they are); preparing a frame is not timed.
    """
    frames = FrameStack(intensities, model.config)
    elapsed = 0.0
    precision = (
        torch.autocast(model.device.type, dtype=model.autocast_dtype)
        if model.autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with torch.inference_mode(), precision:
        model.encode_image(frames.model_input(0, model.device, model.dtype))  # warm-up
        for done in range(count):
            image = frames.model_input(done % len(frames), model.device, model.dtype)
            _synchronize(model.device)
            started = time.perf_counter()
            model.encode_image(image)
            _synchronize(model.device)
            elapsed += time.perf_counter() - started
    return elapsed


def machine(device: torch.device) -> dict[str, object]:
    """What the numbers were measured on."""
    description: dict[str, object] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": platform.platform(terse=True),
        "device": str(device),
    }
    if device.type == "cuda":
        description["gpu"] = torch.cuda.get_device_name(device)
    return description


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _progress_for(progress: ProgressCallback | None, case: Case) -> ProgressCallback | None:
    if progress is None:
        return None
    return lambda done, total, message: progress(done, total, f"({case.key}) {message}")
