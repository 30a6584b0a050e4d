"""Benchmark of ``medsam2 cohort``: rows per minute with 1 and 2 Ray workers, and what Ray adds to one process.

The rows are copies of slicerio's chest CT (CTChest4, 128 x 128 x 34), one structure each (the right and left
lungs in turn, boxed on their largest axial slice), so that every row is its own group and the workers share
the rows evenly. Three runs of the same rows, each into its own folder:

- one process: ``cohort.run.run_group`` for each group in turn, on one torch thread (what a worker does),
  the model loaded once (timed apart);
- Ray with 1 worker and with 2 workers of one CPU (one torch thread) each, through ``run_cohort``, on a local
  Ray instance on loopback that is started once beforehand (its start is timed apart).

Usage: ``python scripts/bench_cohort.py [--rows 4] [--orientations 1] [--model medsam2-lite] [--json FILE]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from medsam2 import io
from medsam2.cohort import Reporter, Resources, Settings, read_table, run_cohort
from medsam2.cohort.plan import ModelChoice, make_groups
from medsam2.cohort.prompt import engine_prompts
from medsam2.cohort.rows import RowSpec, check_rows
from medsam2.cohort.run import Models, run_group
from medsam2.cohort.store import OutputStore
from medsam2.demo import box_on_largest_slice, bundled_data
from medsam2.volume import segment_volume

# Set before Ray is imported (medsam2.cohort imports it only when a run starts): a local instance on 127.0.0.1.
LOOPBACK = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--orientations", type=int, choices=(1, 2, 6), default=1)
    parser.add_argument("--model", default="medsam2-lite")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args()
    os.environ[LOOPBACK] = "0"
    torch.set_num_threads(1)

    work = Path(tempfile.mkdtemp(prefix="bench_cohort_"))
    ct, segmentation = bundled_data()
    reference = io.read_labels(segmentation).array
    lines = ["image,structure,box,slice,orientations"]
    for n in range(args.rows):
        label, name = ((5, "right lung"), (6, "left lung"))[n % 2]
        index, box = box_on_largest_slice(reference == label)
        shutil.copy(ct, work / f"ct{n}.nrrd")
        lines.append(f'ct{n}.nrrd,{name},"{",".join(map(str, box))}",{index},{args.orientations}')
    (work / "cohort.csv").write_text("\n".join(lines) + "\n")
    table = read_table(work / "cohort.csv")
    settings = Settings(model=args.model)
    load_avg = [os.getloadavg()]

    # One process: the same per-group function the workers run.
    started = time.perf_counter()
    models = Models(ModelChoice(), "cpu")
    models.get(args.model)
    load_seconds = time.perf_counter() - started
    groups = make_groups([r for r in check_rows(table, settings) if isinstance(r, RowSpec)], ModelChoice())
    store = OutputStore(work / "one-process")
    cpu, started = time.process_time(), time.perf_counter()
    records = [r for g in groups for r in run_group(g, models, store, "cpu")]
    one = {
        "wall_s": time.perf_counter() - started,
        "cpu_s": time.process_time() - cpu,
        "model_load_s": load_seconds,
        "ok": sum(r.ok for r in records),
    }
    print("one process:", one, flush=True)

    # Frames per row, for the cost per frame: the first row once more, through segment_volume itself.
    image = io.read_image(work / "ct0.nrrd")
    (first,) = groups[0].rows
    prompts = engine_prompts(first.prompt, image, 1)
    cpu = time.process_time()
    result = segment_volume(models.get(args.model), image.array, prompts, spacing=image.spacing_zyx,
                            orientations=args.orientations)  # fmt: skip
    frames = {"frames": sum(result.frames_visited.values()), "cpu_s": time.process_time() - cpu}
    print("one row:", frames, flush=True)

    import ray

    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    ray_start = time.perf_counter() - started
    runs = {}
    for workers in (1, 2):
        meter, started = TreeCpu(), time.perf_counter()
        outcome = run_cohort(table, work / f"ray-{workers}", settings, resources=Resources(workers=workers),
                             reporter=meter)  # fmt: skip
        runs[workers] = {
            "wall_s": time.perf_counter() - started,
            "cpu_s_all_processes": meter.used,
            "row_seconds_sum": sum(r.seconds or 0.0 for r in outcome.records),
            "ok": sum(r.ok for r in outcome.records),
        }
        print(f"ray, {workers} worker(s):", runs[workers], flush=True)
    ray.shutdown()
    load_avg.append(os.getloadavg())

    minutes = {k: v["wall_s"] / 60 for k, v in [("one", one), *[(w, r) for w, r in runs.items()]]}
    report = {
        "rows": args.rows,
        "orientations": args.orientations,
        "model": args.model,
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, ray {ray.__version__}, "
        f"Python {platform.python_version()}",
        "load_average_before_after": load_avg,
        "ray_start_s": ray_start,
        "one_process": one,
        "ray": runs,
        "rows_per_minute": {
            "one process (model load excluded)": args.rows / minutes["one"],
            "ray 1 worker": args.rows / minutes[1],
            "ray 2 workers": args.rows / minutes[2],
        },
        "ray_1_worker_over_one_process": runs[1]["wall_s"] / (one["wall_s"] + one["model_load_s"]),
        "ray_1_worker_over_one_process_cpu": runs[1]["cpu_s_all_processes"] / one["cpu_s"],
        "ray_2_workers_over_one_process_cpu": runs[2]["cpu_s_all_processes"] / one["cpu_s"],
        "ray_2_workers_over_1_worker_speed": runs[1]["wall_s"] / runs[2]["wall_s"],
        "cpu_s_per_row_one_process": one["cpu_s"] / args.rows,
        "first_row": frames,
        "cpu_s_per_frame": frames["cpu_s"] / frames["frames"],
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    shutil.rmtree(work)


def _tree_cpu() -> dict[int, float]:
    """CPU seconds so far of this process and of every process below it (Ray's daemons and workers), by pid.

    A machine shared with other jobs stretches wall times, not these."""
    parents, cpu = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        pid = int(stat.parent.name)
        parents[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier and p not in tree]
        tree.update(children)
        frontier = children
    return {p: cpu[p] for p in tree if p in cpu}


class TreeCpu(Reporter):
    """The CPU seconds the process tree used since it was made, read each time a group ends (while the run's
    workers are alive: they are stopped when the run ends). A process that ended in between (the previous
    run's workers, stopped just before) is left out rather than counted with a negative share."""

    def __init__(self) -> None:
        self.before = _tree_cpu()
        self.used = 0.0

    def finished(self, records) -> None:
        now = _tree_cpu()
        self.used = sum(seconds - self.before.get(pid, 0.0) for pid, seconds in now.items())


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
