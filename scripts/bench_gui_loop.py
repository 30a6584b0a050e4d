"""A GUI thread that holds the GIL, as Slicer's PythonQt event loop does, and an engine run beside it.

Slicer's main thread sits in Qt's event loop (C++) without releasing Python's GIL; Python runs only in short
ticks (timers, observers). This harness reproduces that: the main thread calls ``usleep(100 ms)`` through
``ctypes.PyDLL`` (which, unlike ``ctypes.CDLL``, keeps the GIL during the call) in a loop, and between calls
runs one poll step of the panel. The same CTChest4 run is timed with and without that loop.

``--path worker``: the engine on a Python thread of this process (the design before the engine service).
Prints JSON with the seconds of each run and the frames done by a capped run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import time


def hold_gil_for(seconds: float) -> None:
    """Sleep in C while keeping the GIL, like a Qt event loop that PythonQt entered."""
    libc = ctypes.PyDLL(None)
    libc.usleep(int(seconds * 1e6))


def ctchest4_job():
    """The volume and the right lung's box prompt on its largest axial slice (as the demo draws it)."""
    import medsam2
    from medsam2 import io
    from medsam2.demo import box_on_largest_slice, bundled_data

    ct_path, seg_path = bundled_data()
    volume = io.read_image(ct_path)
    reference = io.read_labels(seg_path, reference=volume)
    value = next(v for v, name in reference.names.items() if name == "right lung")
    index, box = box_on_largest_slice(reference.array == value)
    return volume, [medsam2.Prompt(axis=0, index=index, box=box)]


def run_worker(gui_loop: bool, orientations: int, cap_seconds: float) -> dict:
    import medsam2
    from MedSAM2SlicerLib.worker import Worker

    volume, prompts = ctchest4_job()
    model = medsam2.load_model("medsam2-lite", device="cpu")
    worker = Worker()
    frames = {"done": 0, "total": 0}
    started = time.perf_counter()
    job = worker.submit(
        medsam2.segment_volume,
        model,
        volume.array,
        prompts,
        spacing=volume.spacing_zyx,
        orientations=orientations,
    )
    while not job.done and time.perf_counter() - started < cap_seconds:
        if gui_loop:
            hold_gil_for(0.1)
        else:
            job.wait(0.1)
        for update in job.progress_updates():  # the panel's poll step
            frames.update(done=update.done, total=update.total)
    seconds = time.perf_counter() - started
    finished = job.done
    if not finished:
        job.cancel()
        job.wait(60)
    return {"finished": finished, "seconds": round(seconds, 2), **frames}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--path", choices=["worker"], default="worker")
    parser.add_argument("--orientations", type=int, default=1)
    parser.add_argument("--cap", type=float, default=600.0, help="give up a run after this many seconds")
    args = parser.parse_args()
    result = {"machine": platform.processor() or platform.machine(), "path": args.path}
    result["no_gui_loop"] = run_worker(False, args.orientations, args.cap)
    result["gui_loop"] = run_worker(True, args.orientations, args.cap)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
