"""The GPU check: CUDA parity (float32 and bf16 against the CPU), bf16 speed, and memory, in one command.

Meant for the lent GPU machine (one call, a few minutes on an H200), from the repository root:

    pip install -q torch numpy safetensors SimpleITK scikit-image scipy tqdm && pip install -q --no-deps -e .
    PYTHONUNBUFFERED=1 python scripts/gpu_check.py --out "$OUT"

1. Parity: the golden scenario of Testing/data/golden (the official SAM 2's outputs, tiny model) replayed on
   CUDA in float32 and in bf16 autocast: max absolute logit difference against the oracle, and mask IoU.
2. Speed and memory: ``sam2.1_hiera_t`` at 512 px (random weights, the object-score bias raised so that the
   object is tracked rather than dropped) on a synthetic 200 x 512 x 512 volume with a moving ellipsoid, all six
   orientations with ``roi=None`` and no early stop (the worst case), in float32 and bf16: seconds, frames per
   second, peak GPU memory; the image encoder alone per frame (the floor).
Writes ``gpu_check.json`` and ``gpu_check.md`` (rows for BENCHMARKS.md) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MedSAM2Slicer"))
sys.path.insert(0, str(ROOT / "Testing"))

from golden import GOLDEN, golden_meta, golden_model, replay_scenario  # noqa: E402

import medsam2  # noqa: E402
from medsam2.frames import FrameStack  # noqa: E402


def golden_parity(dtype: str | None, device: str) -> dict:
    """Max abs logit difference and min mask IoU of the golden scenario against the oracle's outputs."""
    out = {}
    for flavour in ("sam2.0", "sam2.1"):
        model = golden_model(flavour, device=device, dtype=dtype)
        frames = np.load(GOLDEN / flavour / "frames.npy")
        reference = np.load(GOLDEN / flavour / "sequence.npz")
        session = medsam2.Session(model, frames, memory=medsam2.MemoryOptions(policy="recent"))
        ours = replay_scenario(session, golden_meta(flavour)["scenario"])
        diffs, ious = [], []
        for key in reference.files:
            ref, mine = reference[key], ours[key]
            diffs.append(float(np.abs(ref - mine).max()))
            a, b = ref > 0, mine > 0
            ious.append(float((a & b).sum() / max((a | b).sum(), 1)) if (a | b).any() else 1.0)
        out[flavour] = {"max_abs_logit_diff": max(diffs), "min_mask_iou": min(ious)}
    return out


def synthetic_volume(depth: int, size: int) -> np.ndarray:
    """A CT-like int16 volume with a bright ellipsoid that drifts across slices."""
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[0:depth, 0:size, 0:size].astype(np.float32)
    centre_x = size * (0.4 + 0.2 * z / depth)
    inside = ((x - centre_x) / (0.12 * size)) ** 2 + ((y - size / 2) / (0.15 * size)) ** 2 + (
        (z - depth / 2) / (0.35 * depth)
    ) ** 2 < 1
    volume = rng.normal(-100, 30, size=inside.shape).astype(np.float32)
    volume[inside] += 160
    return volume.astype(np.int16)


def speed(dtype: str | None, volume: np.ndarray, device: str, image_size: int) -> dict:
    dev = torch.device(device)
    torch.manual_seed(0)
    model = medsam2.build_model(medsam2.ModelConfig.preset("sam2.1_hiera_t", image_size=image_size)).to(dev)
    with torch.no_grad():  # random weights: keep the object "present" so that it is tracked everywhere
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.add_(20.0)
    model.autocast_dtype = medsam2.load.resolve_autocast(dtype, dev)
    depth, size = volume.shape[0], volume.shape[1]
    prompt = medsam2.Prompt(axis=0, index=depth // 2, box=(0.3 * size, 0.35 * size, 0.6 * size, 0.65 * size))
    memory = medsam2.MemoryOptions(storage_dtype="bfloat16" if dtype else "float32")
    warm_up = volume[:8]
    medsam2.segment_volume(
        model, warm_up, [medsam2.Prompt(axis=0, index=len(warm_up) // 2, box=prompt.box)], orientations=2
    )
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = medsam2.segment_volume(
        model, volume, [prompt], orientations=6, roi=None, early_stop=False, memory=memory, window="abdomen"
    )
    _sync(dev)
    seconds = time.perf_counter() - start
    frames = sum(result.frames_visited.values())
    stack = FrameStack(volume[:32].astype(np.float32) / 4096 + 0.5, model.config)
    images = [stack.model_input(i, dev) for i in range(min(32, len(volume)))]
    ctx = torch.autocast(dev.type, dtype=model.autocast_dtype) if model.autocast_dtype else torch.no_grad()
    with torch.inference_mode(), ctx:
        for image in images[:4]:
            model.encode_image(image)
        _sync(dev)
        t0 = time.perf_counter()
        for image in images:
            model.encode_image(image)
        _sync(dev)
    encoder = (time.perf_counter() - t0) / len(images)
    return {
        "seconds_6_orientations": round(seconds, 2),
        "frames_visited": frames,
        "frames_per_second": round(frames / seconds, 1),
        "encoder_ms_per_frame": round(1000 * encoder, 2),
        "encoder_floor_seconds": round(encoder * frames, 2),
        "peak_gpu_memory_gib": _peak_memory_gib(dev),
    }


def _peak_memory_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--depth", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--device", default="cuda", help="cuda (the check); cpu only to try the script out")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA GPU: this script is for the GPU machine (--device cpu to try it out)")
    bf16 = "bfloat16" if args.device == "cuda" else None
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "no GPU (CPU try-out)"
    report = {
        "machine": f"{gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"{platform.processor() or platform.machine()}",
        "parity_float32": golden_parity(None, args.device),
        "parity_bf16": golden_parity(bf16, args.device),
    }
    print(json.dumps(report, indent=1), flush=True)
    volume = synthetic_volume(args.depth, args.size)
    report["speed_float32"] = speed(None, volume, args.device, args.image_size)
    print("float32", report["speed_float32"], flush=True)
    report["speed_bf16"] = speed(bf16, volume, args.device, args.image_size)
    print("bf16", report["speed_bf16"], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    rows = [f"Machine: {report['machine']}", "", "| check | float32 | bf16 |", "|---|---|---|"]
    for flavour in ("sam2.0", "sam2.1"):
        f32, bf = report["parity_float32"][flavour], report["parity_bf16"][flavour]
        rows.append(
            f"| golden {flavour}: max abs logit diff / min mask IoU vs oracle | "
            f"{f32['max_abs_logit_diff']:.2e} / {f32['min_mask_iou']:.3f} | "
            f"{bf['max_abs_logit_diff']:.2e} / {bf['min_mask_iou']:.3f} |"
        )
    for key in (
        "seconds_6_orientations",
        "frames_visited",
        "frames_per_second",
        "encoder_ms_per_frame",
        "encoder_floor_seconds",
        "peak_gpu_memory_gib",
    ):
        rows.append(
            f"| {key} ({args.depth}x{args.size}x{args.size}, sam2.1_hiera_t @{args.image_size}) | "
            f"{report['speed_float32'][key]} | {report['speed_bf16'][key]} |"
        )
    (args.out / "gpu_check.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
