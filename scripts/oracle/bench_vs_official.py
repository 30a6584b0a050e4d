"""Speed of our engine against the official SAM 2 package, same weights, same frames, same process.

Run by hand with the oracle environment of make_golden.py (the official package is never a project dependency):

    /tmp/oracle/bin/python scripts/oracle/bench_vs_official.py --sizes 512 1024 --frames 16

For ``sam2.1_hiera_t`` with random weights at each image size it times, alternating ours and theirs:
the image encoder on one frame (median of repeats), and a 16-frame propagation from a box prompt (frame
encoding included). Prints Markdown rows for BENCHMARKS.md with the machine description.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "MedSAM2Slicer"))
sys.path.insert(0, str(Path(__file__).parent))

import make_golden  # noqa: E402  (the float32-memory patch and the official predictor module)
from sam2.build_sam import build_sam2_video_predictor  # noqa: E402

import medsam2  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {load:.1f} at start"
    )


def frames(count: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for t in range(count):
        img = 0.3 + 0.05 * rng.standard_normal((size, size))
        img += 0.5 * (((xx - 0.4 - 0.01 * t) / 0.15) ** 2 + ((yy - 0.5) / 0.2) ** 2 < 1)
        out.append(np.clip(img, 0, 1))
    return (np.stack(out) * 255).astype(np.uint8)


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall time and median CPU time (all threads of the process) of ``fn``, in seconds.

    On a shared machine the CPU time is the fairer comparison: it does not count time spent waiting for a core.
    """
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def bench_size(size: int, args: argparse.Namespace) -> None:
    official = build_sam2_video_predictor(
        "configs/sam2.1/sam2.1_hiera_t.yaml",
        ckpt_path=None,
        device="cpu",
        hydra_overrides_extra=[f"++model.image_size={size}", "++model.fill_hole_area=0"],
    ).eval()
    ours = medsam2.build_model(medsam2.ModelConfig.preset("sam2.1_hiera_t", image_size=size))
    ours.load_state_dict(official.state_dict(), strict=True)
    video = frames(args.frames, size)
    images = make_golden.model_images(video, size)
    box = [0.25 * size, 0.3 * size, 0.55 * size, 0.7 * size]

    with torch.inference_mode():
        enc_theirs = timed(lambda: official.forward_image(images[:1]), args.repeats)
        enc_ours = timed(lambda: ours.encode_image(images[:1]), args.repeats)

    def run_official():
        make_golden.official_vp.load_video_frames = lambda **kw: (images, size, size)
        state = official.init_state(video_path="unused")
        official.add_new_points_or_box(state, 0, 1, box=box)
        for _ in official.propagate_in_video(state):
            pass

    def run_ours():
        session = medsam2.Session(ours, video, memory=medsam2.MemoryOptions(policy="recent"))
        session.add_prompt(0, 1, box=box)
        for _ in session.propagate():
            pass

    prop_theirs = timed(run_official, max(1, args.repeats - 1))
    prop_ours = timed(run_ours, max(1, args.repeats - 1))
    for part, theirs, mine in (
        ("image encoder, 1 frame", enc_theirs, enc_ours),
        (f"{args.frames}-frame propagation", prop_theirs, prop_ours),
    ):
        print(
            f"| {size} | {part} | {theirs[0]:.2f} / {theirs[1]:.2f} | {mine[0]:.2f} / {mine[1]:.2f} | "
            f"{mine[1] / theirs[1]:.2f} |"
        )
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    make_golden.keep_memory_in_float32()
    print(f"Machine: {machine()}\n")
    print("| image size | part | official wall / CPU (s) | ours wall / CPU (s) | ours / official (CPU) |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        bench_size(size, args)


if __name__ == "__main__":
    main()
