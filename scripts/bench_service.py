"""Benchmarks of the engine service (BENCHMARKS.md, "Engine service"), on the demo volume (slicerio's CTChest4)
with the offline default model medsam2-lite on the CPU:

1. overhead: the demo's segmentation (both lungs from one box each, six orientations, lung window) through a
   local server against the same call in this process (server with its feature cache off, model loaded);
2. second object: on a server that segmented the right lung, the left lung, against the right lung's time;
3. cold start: from pressing Segment (``SegmentationLogic.start`` with a new ``LocalEngine``) to the first
   progress update: the server's start, the model's load and the first frame;
4. GUI loop: a run started from a main thread that holds the GIL between 100 ms poll steps, as Slicer's
   PythonQt event loop does (``usleep`` through ``ctypes.PyDLL``), against one with a normally sleeping main
   thread (one orientation, the right lung: the run that the removed worker-thread path was measured on).

    .venv/bin/python scripts/bench_service.py --json bench-service.json

Prints a JSON summary; each ratio compares runs made in this one process, one after the other.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import medsam2
from medsam2 import io
from medsam2.demo import box_on_largest_slice, bundled_data
from medsam2.service.local import LocalServer
from MedSAM2SlicerLib.engines import LocalEngine, RunPhase

DEMO_OPTIONS = {"orientations": 6, "window": "lung", "modality": "ct"}


def demo_case():
    """The CT, its spacing, and a box prompt on the largest axial slice of each lung (object ids 1, 2)."""
    ct_path, reference_path = bundled_data()
    image = io.read_image(ct_path)
    reference = io.read_labels(reference_path, reference=image)
    prompts = {}
    for obj_id, name in enumerate(("right lung", "left lung"), start=1):
        value = next(v for v, n in reference.names.items() if n == name)
        index, box = box_on_largest_slice(reference.array == value)
        prompts[name] = medsam2.Prompt(axis=0, index=index, obj_id=obj_id, box=box)
    return image, prompts


def warm_up(client, device: str) -> None:
    """Load the model on the server with a small job of its own (other voxels: no feature is shared)."""
    noise = np.random.default_rng(0).integers(0, 1000, (4, 32, 32)).astype(np.int16)
    client.segment_volume(noise, [medsam2.Prompt(axis=0, index=1, box=(4, 4, 20, 20))], device=device)


def timed(function) -> tuple[float, object]:
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


def overhead(image, prompts, device: str, repeats: int = 2) -> dict:
    both = list(prompts.values())
    model = medsam2.load_model("medsam2-lite", device=device)
    server = LocalServer(extra_args=("--feature-cache-mb", "0"))
    client = server.wait_ready()

    def in_process():
        return medsam2.segment_volume(model, image.array, both, spacing=image.spacing_zyx, **DEMO_OPTIONS)

    def served():
        return client.segment_volume(
            image.array, both, spacing=image.spacing_zyx, device=device, **DEMO_OPTIONS
        )

    try:
        # Both sides warm (model loaded, first inference done), then alternating runs; the best of each.
        warm_up(client, device)
        noise = np.random.default_rng(0).integers(0, 1000, (4, 32, 32)).astype(np.int16)
        medsam2.segment_volume(model, noise, [medsam2.Prompt(axis=0, index=1, box=(4, 4, 20, 20))])
        local_s, served_s = [], []
        for _ in range(repeats):
            seconds, local = timed(in_process)
            local_s.append(seconds)
            seconds, remote = timed(served)
            served_s.append(seconds)
    finally:
        server.stop()
    return {
        "in_process_s": [round(t, 2) for t in local_s],
        "server_s": [round(t, 2) for t in served_s],
        "ratio_of_best": round(min(served_s) / min(local_s), 3),
        "labels_identical": bool(np.array_equal(local.labels, remote.labels)),
        "frames_encoded": remote.frames_encoded,
    }


def second_object(image, prompts, device: str) -> dict:
    server = LocalServer()
    client = server.wait_ready()
    try:
        warm_up(client, device)
        runs = {}
        for name in ("right lung", "left lung"):
            prompt = [medsam2.Prompt(**{**vars(prompts[name]), "obj_id": 1})]
            seconds, result = timed(
                lambda p=prompt: client.segment_volume(
                    image.array, p, spacing=image.spacing_zyx, device=device, **DEMO_OPTIONS
                )
            )
            runs[name] = {"s": round(seconds, 2), "frames_encoded": result.frames_encoded}
            runs[name]["frames_visited"] = sum(result.frames_visited.values())
    finally:
        server.stop()
    return {**runs, "ratio": round(runs["left lung"]["s"] / runs["right lung"]["s"], 3)}


def cold_start(image, prompts, device: str) -> dict:
    engine = LocalEngine()
    request = SimpleNamespace(
        volume=image.array,
        prompts=[prompts["right lung"]],
        geometry=SimpleNamespace(spacing=image.spacing_zyx),
        threshold=None,
        options=DEMO_OPTIONS,
    )
    try:
        started = time.perf_counter()
        run = engine.submit(request, "medsam2-lite", device)
        phases = {}
        while True:
            status = run.poll()
            phases.setdefault(status.phase.value, round(time.perf_counter() - started, 2))
            if status.phase is RunPhase.RUNNING and status.done >= 1:
                break
            if status.phase.finished:
                raise RuntimeError(f"the run ended early: {status}")
            time.sleep(0.02)
        first_progress = time.perf_counter() - started
        run.cancel()
    finally:
        engine.shutdown()
    return {"first_progress_s": round(first_progress, 2), "phase_first_seen_s": phases}


def gui_loop(image, prompts, device: str) -> dict:
    engine = LocalEngine(LocalServer(extra_args=("--feature-cache-mb", "0")))  # every run encodes its frames
    request = SimpleNamespace(
        volume=image.array,
        prompts=[prompts["right lung"]],
        geometry=SimpleNamespace(spacing=image.spacing_zyx),
        threshold=None,
        options={**DEMO_OPTIONS, "orientations": 1, "window": None},
    )
    libc = ctypes.PyDLL(None)

    def one_run(hold_gil: bool) -> float:
        started = time.perf_counter()
        run = engine.submit(request, "medsam2-lite", device)
        while not run.poll().phase.finished:  # the panel's poll step
            if hold_gil:
                libc.usleep(100_000)
            else:
                time.sleep(0.1)
        run.result()
        return time.perf_counter() - started

    try:
        one_run(False)  # starts the server and loads the model
        plain, held = one_run(False), one_run(True)
    finally:
        engine.shutdown()
    return {"no_gui_loop_s": round(plain, 2), "gui_loop_s": round(held, 2), "ratio": round(held / plain, 3)}


def machine() -> str:
    """The processor's model name (Linux), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            name = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", action="append", choices=["overhead", "second", "cold", "gui"])
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args()
    image, prompts = demo_case()
    summary = {"machine": machine(), "device": args.device, "torch_threads": torch.get_num_threads()}
    for name, bench in (
        ("overhead", overhead),
        ("second", second_object),
        ("cold", cold_start),
        ("gui", gui_loop),
    ):
        if not args.only or name in args.only:
            summary[name] = bench(image, prompts, args.device)
            print(json.dumps({name: summary[name]}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
