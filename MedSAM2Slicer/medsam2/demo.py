"""``medsam2 demo``: segment a structure of a real bundled chest CT from one box, offline, and score it.

The data are slicerio's ``CTChest4.nrrd`` (128 x 128 x 34 CT) and its reference ``Segmentation.seg.nrrd``.
The box is the reference's bounding box on the axial slice where the structure is largest (what a clinician
would draw); the engine segments the whole volume from it. Writes the segmentation (``.seg.nrrd``, on the CT's
grid) and a PNG preview, and prints Dice and HD95 against the reference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from . import io, metrics
from .errors import MedSAM2Error
from .load import load_model
from .memory import MemoryOptions
from .preprocess import prepare_intensities
from .preview import volume_preview
from .prompts import Prompt
from .volume import segment_volume

DEFAULT_STRUCTURES = ("right lung", "left lung")


def bundled_data() -> tuple[Path, Path]:
    """Paths of the bundled CT and its reference segmentation (from the slicerio package)."""
    try:
        import slicerio
    except ImportError as exc:
        raise MedSAM2Error(
            "The demo data come with the slicerio package: pip install slicerio==1.4.0"
        ) from exc
    folder = Path(slicerio.__file__).parent / "data"
    return folder / "CTChest4.nrrd", folder / "Segmentation.seg.nrrd"


def box_on_largest_slice(mask: np.ndarray) -> tuple[int, tuple[int, int, int, int]]:
    """The axial slice where ``mask`` ``[Z, Y, X]`` is largest and the box ``(x0, y0, x1, y1)`` of its pixels
    there, on pixel edges (``x1`` = last column + 1), as a box drawn around them would be."""
    index = int(np.argmax(mask.sum(axis=(1, 2))))
    rows, cols = np.nonzero(mask[index])
    return index, (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="medsam2 demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("medsam2-demo"), help="where to write")
    parser.add_argument(
        "--model", default="medsam2-lite", help="registry name or checkpoint (default: %(default)s)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: %(default)s)")
    parser.add_argument(
        "--structure",
        action="append",
        help=f"reference segment to segment; repeat for several (default: {', '.join(DEFAULT_STRUCTURES)})",
    )
    parser.add_argument("--orientations", type=int, choices=(1, 2, 6), default=6)
    parser.add_argument("--memory", choices=("self-sorting", "recent"), default="self-sorting")
    args = parser.parse_args(argv)
    try:
        summary = run(args)
    except MedSAM2Error as exc:
        print(f"medsam2 demo: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def run(args: argparse.Namespace) -> dict:
    ct_path, reference_path = bundled_data()
    image = io.read_image(ct_path)
    reference = io.read_labels(reference_path, reference=image)
    names = args.structure or list(DEFAULT_STRUCTURES)
    values = {}
    for name in names:
        if name not in reference.names.values():
            known = ", ".join(reference.names.values())
            raise MedSAM2Error(f"No segment named {name!r} in the demo reference; choose from: {known}")
        values[name] = next(v for v, n in reference.names.items() if n == name)

    prompts = []
    for obj_id, name in enumerate(names, start=1):
        index, box = box_on_largest_slice(reference.array == values[name])
        prompts.append(Prompt(axis=0, index=index, obj_id=obj_id, box=box))

    started = time.perf_counter()
    model = load_model(args.model, device=args.device)
    loaded = time.perf_counter()
    # Lung structures are only visible in a lung window; soft tissue in the default abdomen window.
    window = "lung" if all("lung" in n for n in names) else None
    progress = _progress_bar()
    try:
        result = segment_volume(
            model,
            image.array,
            prompts,
            spacing=image.spacing_zyx,
            modality="ct",
            window=window,
            orientations=args.orientations,
            memory=MemoryOptions(policy=args.memory),
            progress=progress,
        )
    finally:
        progress.close()
    segmented = time.perf_counter()

    args.output_dir.mkdir(parents=True, exist_ok=True)
    seg_path = io.write_labels(
        result.labels,
        image,
        args.output_dir / "CTChest4-medsam2.seg.nrrd",
        names={i: n for i, n in enumerate(names, 1)},
    )
    intensities = prepare_intensities(image.array, modality="ct", window=window)
    png_path = io.write_png(
        args.output_dir / "CTChest4-medsam2.png",
        volume_preview(intensities, result.labels, prompts, image.spacing_zyx, superior_up=True),
    )
    scores = {}
    for obj_id, name in enumerate(names, start=1):
        predicted, truth = result.labels == obj_id, reference.array == values[name]
        scores[name] = {
            "dice": round(metrics.dice(predicted, truth), 4),
            "hd95_mm": round(metrics.hd95(predicted, truth, spacing=image.spacing_zyx), 2),
            "prompt": {
                "axial_slice": prompts[obj_id - 1].index,
                "box": list(map(int, prompts[obj_id - 1].box)),
            },
        }
    return {
        "model": str(args.model),
        "device": str(model.device),
        "segmentation": str(seg_path),
        "preview": str(png_path),
        "scores": scores,
        "frames_visited": result.frames_visited,
        "seconds": {"load_model": round(loaded - started, 2), "segment": round(segmented - loaded, 2)},
    }


class _progress_bar:  # noqa: N801 (used like a function)
    """A tqdm bar driven by segment_volume's progress callback."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=1, unit="frame", desc="segmenting", file=sys.stderr, leave=False)

    def __call__(self, done: int, total: int, message: str) -> None:
        self.bar.total = total
        self.bar.set_description(message)
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
