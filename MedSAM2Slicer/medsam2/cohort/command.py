"""``medsam2 cohort TABLE --out DIR``: its options, and the handler that runs it with a progress bar."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from .. import models
from ..cli_inputs import model_config, parse_window
from ..errors import InputError
from ..preprocess import MODALITIES, WINDOW_PRESETS
from .driver import Reporter, Resources, Task, require_ray
from .job import Outcome, run_cohort
from .plan import ModelChoice
from .rows import MEMORY_POLICIES, ORIENTATIONS, Settings
from .store import RowRecord
from .table import COLUMNS, read_table

HELP = "segment a cohort: one structure per row of a table, on Ray, resumable"
DESCRIPTION = (
    "Segment the structure of every row of TABLE (.csv or .parquet) into DIR, on a local Ray instance or a Ray "
    "cluster. Rows of one image are segmented together (the image is read and encoded once). A re-run skips "
    "the rows whose output exists with the same parameters."
)
_SHOWN_FAILURES = 10


def epilog() -> str:
    columns = "\n".join(f"  {name:<16}{text}" for name, text in COLUMNS.items())
    return f"""\
table columns (image, structure and one prompt column are needed; other columns are carried to the results):
{columns}

outputs:
  DIR/ID.seg.nrrd (one segment on the image's grid), DIR/records/ID.json, and DIR/results.csv: per row its
  status, output, volume in mL, Dice and HD95 (mm) against the reference, seconds, device, attempts, error.
  Exit status 0 when every row succeeded, 1 when some failed, 2 for a bad table or option.

examples:
  medsam2 cohort lesions.csv --out segs/
  medsam2 cohort cohort.parquet --out segs/ --model MedSAM2_latest --ray-address auto --gpus-per-worker 0.5

lesions.csv:
  image,structure,recist,slice,reference,reference_label
  ct001.nii.gz,lesion1,"120,88,151,102",40,ct001_seg.nii.gz,1
  (cells holding commas are quoted, as in any CSV file)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "table", metavar="TABLE", help="cohort table: .csv or .parquet, one row per structure"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    rows = parser.add_argument_group("defaults of the rows (a row's own column wins)")
    rows.add_argument(
        "--model",
        default="medsam2-lite",
        metavar="NAME|PATH",
        help="registered model or checkpoint file (default: medsam2-lite)",
    )
    rows.add_argument(
        "--config",
        metavar="PRESET|JSON",
        help="configuration of the checkpoint files (default: detected from each file)",
    )
    rows.add_argument("--image-size", type=int, metavar="S", help="model input size (default: the model's)")
    rows.add_argument(
        "--window",
        metavar="NAME|LEVEL,WIDTH",
        help=f"CT window: {', '.join(WINDOW_PRESETS)}, or LEVEL,WIDTH in HU (default for CT: abdomen)",
    )
    rows.add_argument("--modality", choices=MODALITIES, default="auto")
    rows.add_argument("--orientations", type=int, choices=ORIENTATIONS, default=6)
    rows.add_argument("--memory", choices=MEMORY_POLICIES, default="self-sorting")
    rows.add_argument("--seed", type=int, default=0, help="seed of the memory bank's sampling (default: 0)")
    ray = parser.add_argument_group("Ray")
    ray.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="an existing Ray cluster (host:port, or auto); default: a local Ray instance on this machine",
    )
    ray.add_argument(
        "--workers", type=int, metavar="N", help="workers (default: as many as the cluster holds)"
    )
    ray.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="C", help="(default: 1)")
    ray.add_argument(
        "--gpus-per-worker",
        type=float,
        metavar="G",
        help="GPUs per worker, a fraction to share one (default: 1 when the cluster has GPUs, else 0)",
    )
    ray.add_argument(
        "--retries",
        type=int,
        default=2,
        metavar="N",
        help="runs of a row again after its worker died (default: 2)",
    )


def run(args: argparse.Namespace) -> int:
    require_ray()
    resources = _resources(args)
    defaults = Settings(
        model=_model_source(args.model),
        window=parse_window(args.window),
        orientations=args.orientations,
        memory=args.memory,
        modality=args.modality,
        seed=args.seed,
    )
    choice = ModelChoice(config=model_config(args.config), image_size=args.image_size)
    table = read_table(args.table)
    bar = ProgressBar()
    try:
        outcome = run_cohort(table, args.out, defaults, choice, resources, args.ray_address, bar)
    finally:
        bar.close()
    print(summary(outcome))
    return 1 if outcome.failed else 0


def _resources(args: argparse.Namespace) -> Resources:
    for name in ("workers", "cpus_per_worker"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {value:g}")
    if args.gpus_per_worker is not None and args.gpus_per_worker < 0:
        raise InputError(f"--gpus-per-worker cannot be negative, got {args.gpus_per_worker:g}")
    if args.retries < 0:
        raise InputError(f"--retries cannot be negative, got {args.retries}")
    return Resources(args.workers, args.cpus_per_worker, args.gpus_per_worker, args.retries)


def _model_source(model: str) -> str:
    path = Path(model).expanduser()
    if path.is_file():
        return str(path.resolve())
    models.get(model)  # raises, listing the registered names, when it is neither
    return model


def summary(outcome: Outcome) -> str:
    records = outcome.records
    ok = sum(r.ok for r in records)
    lines = [
        f"{len(records)} rows: {ok} ok ({outcome.skipped} finished earlier, skipped), "
        f"{len(outcome.failed)} failed; results in {outcome.results}"
    ]
    for record in outcome.failed[:_SHOWN_FAILURES]:
        lines.append(f"  failed {record.id}: {record.error}")
    if len(outcome.failed) > _SHOWN_FAILURES:
        lines.append(f"  ... and {len(outcome.failed) - _SHOWN_FAILURES} more (see the results table)")
    return "\n".join(lines)


class ProgressBar(Reporter):
    """Rows done of the rows to run, the failed ones, and tqdm's estimate of the time left, on stderr."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.failures = 0

    def begin(self, rows: int, skipped: int) -> None:
        self.bar = tqdm(total=rows, unit="row", file=sys.stderr, disable=None, dynamic_ncols=True)
        self.bar.set_postfix_str("0 failed")

    def retrying(self, task: Task, error: str, attempt: int) -> None:
        if self.bar is not None:
            self.bar.write(
                f"worker lost running {', '.join(task.rows)} (attempt {attempt}): {error}; retrying"
            )

    def finished(self, records: Sequence[RowRecord]) -> None:
        self.failures += sum(r.status == "failed" for r in records)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.failures} failed", refresh=False)
            self.bar.update(len(records))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
