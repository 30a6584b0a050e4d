"""What the ``medsam2`` subcommands do, given their parsed arguments (``cli.py`` holds the parser).

Every handler checks all its inputs before the model runs, and writes its output files only once everything
has succeeded, each file atomically: a failed command leaves no partial output behind.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io as text_io
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import bench, io, models
from .cli_inputs import (
    PromptArgs,
    check_output,
    image_prompt,
    model_config,
    open_model,
    parse_window,
    picture_files,
    random_model,
    template_index,
    volume_prompts,
)
from .errors import InputError
from .images import segment_images
from .load import resolve_device
from .memory import MemoryOptions
from .metrics import per_label_table
from .preprocess import prepare_intensities
from .preview import Marks, images_preview, volume_preview
from .volume import ProgressCallback, VolumeResult, segment_volume

PREVIEW_SUFFIXES = (".png",)


# ---------------------------------------------------------------------------------------------- segment


def segment(args: argparse.Namespace) -> int:
    output = check_output(args.output, io.LABEL_SUFFIXES, "OUTPUT")
    preview_path = check_output(args.preview, PREVIEW_SUFFIXES, "--preview") if args.preview else None
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        raise InputError(f"--threshold is a probability between 0 and 1, got {args.threshold:g}")
    client = server_client(args)
    if client is None:
        resolve_device(args.device)
    window = parse_window(args.window)
    config = model_config(args.config)
    memory = MemoryOptions(policy=args.memory)
    image = io.read_image(args.input)
    _refuse_overwriting_input(output, image)
    prompts = volume_prompts(prompt_args(args), image)
    options = {
        "modality": args.modality,
        "window": window,
        "orientations": args.orientations,
        "aggregate": args.aggregate,
        "memory": memory,
        "roi": None if args.no_roi else "auto",
        "seed": args.seed,
        "pipeline": args.pipeline,
    }
    if client is not None:
        job = client.submit_volume(
            image.array,
            prompts,
            model=args.model,
            spacing=image.spacing_zyx,
            device=args.device,
            config=config,
            image_size=args.image_size,
            return_probabilities=args.threshold is not None,
            **options,
        )
        with progress_bar() as progress:
            result = job.wait(progress)
    else:
        model = open_model(args.model, config, args.image_size, args.device)
        with progress_bar() as progress:
            result = segment_volume(
                model, image.array, prompts, spacing=image.spacing_zyx, progress=progress, **options
            )
    labels = thresholded(result, args.obj_id, args.threshold)
    preview = None
    if preview_path is not None:
        intensities = prepare_intensities(image.array, modality=args.modality, window=window)
        superior_up = float(np.asarray(image.direction)[2, 2]) > 0  # LPS: +z points to the head
        preview = volume_preview(intensities, labels, prompts, image.spacing_zyx, superior_up)
    io.write_labels(labels, image, output)
    if preview is not None:
        io.write_png(preview_path, preview)
    print(_summary(output, labels, args.obj_id, image.spacing_zyx, result))
    return 0


def server_client(args: argparse.Namespace):
    """The client of ``--server``, with the token of ``--token-file`` or ``$MEDSAM2_SERVER_TOKEN``; None
    when the command runs the engine itself."""
    if not getattr(args, "server", None):
        return None
    from .service.client import EngineClient
    from .service.serve import TOKEN_ENV, read_token

    token = read_token(Path(args.token_file) if args.token_file else None)
    if token is None:
        raise InputError(f"--server needs the server's token: --token-file FILE or ${TOKEN_ENV}")
    return EngineClient(args.server, token)


def prompt_args(args: argparse.Namespace) -> PromptArgs:
    return PromptArgs(
        points=list(args.point or []),
        box=args.box,
        mask=args.mask,
        mask_label=args.mask_label,
        slice_index=getattr(args, "slice", None),
        axis=getattr(args, "axis", "axial"),
        world=getattr(args, "world", False),
        obj_id=getattr(args, "obj_id", 1),
        absent=list(getattr(args, "absent", None) or []),
    )


def thresholded(result: VolumeResult, obj_id: int, threshold: float | None) -> np.ndarray:
    """The result's label map, or ``obj_id`` where its probability is at least ``threshold``."""
    if threshold is None:
        return result.labels
    return np.where(result.probabilities[obj_id] >= threshold, obj_id, 0).astype(result.labels.dtype)


def _refuse_overwriting_input(output: Path, image: io.Image) -> None:
    if any(Path(f).resolve() == output.resolve() for f in image.files):
        raise InputError(f"Refusing to overwrite the input image {output}: choose another output file")


def _summary(
    output: Path, labels: np.ndarray, obj_id: int, spacing_zyx: Sequence[float], result: VolumeResult
) -> str:
    mask = labels == obj_id
    voxels = int(mask.sum())
    millilitres = voxels * float(np.prod(spacing_zyx)) / 1000.0
    frames = sum(result.frames_visited.values())
    seconds = result.timings.get("total", 0.0)
    where = "no voxels"
    if voxels:
        slices = np.flatnonzero(mask.any(axis=(1, 2)))
        where = f"{voxels} voxels ({millilitres:.1f} mL), axial slices {slices[0]}-{slices[-1]}"
    return f"{output}: object {obj_id}, {where}; {frames} frames in {seconds:.1f} s"


@contextlib.contextmanager
def progress_bar(unit: str = "frame") -> Iterator[ProgressCallback]:
    """A tqdm bar on stderr (hidden when stderr is not a terminal) fed by the engine's progress calls."""
    bar = tqdm(total=1, unit=unit, file=sys.stderr, disable=None, dynamic_ncols=True)

    def update(done: int, total: int, message: str) -> None:
        bar.total = max(total, done)
        bar.set_description_str(message, refresh=False)
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


# ----------------------------------------------------------------------------------------------- images


def images(args: argparse.Namespace) -> int:
    files = picture_files(args.folder)
    template = template_index(files, args.template)
    outdir = Path(args.output)
    if outdir.exists() and not outdir.is_dir():
        raise InputError(f"-o {outdir} exists and is not a folder")
    if outdir.resolve() == Path(args.folder).resolve():
        raise InputError("-o must be another folder than the input images: the masks would replace them")
    if not outdir.parent.is_dir():
        raise InputError(f"Cannot create {outdir}: the folder {outdir.parent} does not exist")
    preview_path = check_output(args.preview, PREVIEW_SUFFIXES, "--preview") if args.preview else None
    mask_names = [f.stem + ".png" for f in files]
    twins = {n for n in mask_names if mask_names.count(n) > 1}
    if twins:
        raise InputError(f"Several images would give the mask file {sorted(twins)[0]}: rename one of them")
    client = server_client(args)
    if client is None:
        resolve_device(args.device)
    config = model_config(args.config)
    memory = MemoryOptions(policy=args.memory)
    pictures = [io.read_2d_image(f) for f in files]
    prompt = image_prompt(prompt_args(args), pictures[template].shape[:2])
    fields = {"points": prompt.points, "labels": prompt.labels, "box": prompt.box, "mask": prompt.mask}
    if client is not None:
        model = {"model": args.model, "device": args.device, "config": config, "image_size": args.image_size}
        job = client.submit_images(pictures, template, memory=memory, seed=args.seed, **model, **fields)
        with progress_bar("image") as progress:
            masks = job.wait(progress)
    else:
        model = open_model(args.model, config, args.image_size, args.device)
        with progress_bar("image") as progress:
            masks = segment_images(
                model, pictures, template=template, memory=memory, seed=args.seed, progress=progress, **fields
            )
    sheet = None
    if preview_path is not None:
        marks = Marks(
            points=None if prompt.points is None else np.asarray(prompt.points),
            point_labels=None if prompt.labels is None else np.asarray(prompt.labels),
            box=None if prompt.box is None else np.asarray(prompt.box),
            mask=prompt.mask,
        )
        sheet = images_preview(pictures, masks, [f.name for f in files], template, marks)
    outdir.mkdir(exist_ok=True)
    for name, mask in zip(mask_names, masks):
        io.write_png(outdir / name, mask.astype(np.uint8) * 255)
    if sheet is not None:
        io.write_png(preview_path, sheet)
    found = sum(bool(m.any()) for m in masks)
    print(f"{outdir}: {len(masks)} masks written ({found} not empty), template {files[template].name}")
    return 0


# --------------------------------------------------------------------------------------------- evaluate

EVALUATION_COLUMNS = (
    "label",
    "name",
    "dice",
    "iou",
    "hd95",
    "pred_voxels",
    "ref_voxels",
    "pred_ml",
    "ref_ml",
)


def evaluate(args: argparse.Namespace) -> int:
    output = Path(args.output) if args.output else None
    if output is not None and not output.parent.is_dir():
        raise InputError(f"Cannot write {output}: the folder {output.parent} does not exist")
    reference = io.read_labels(args.reference)
    prediction = io.read_labels(args.prediction)
    difference = grid_difference(prediction.image, reference.image)
    if difference is not None:
        if not args.resample:
            raise InputError(
                f"The prediction and the reference lie on different grids ({difference}); pass --resample "
                "to compare the prediction resampled (nearest neighbour) onto the reference grid"
            )
        prediction = io.read_labels(args.prediction, reference=reference.image)
    rows = per_label_table(prediction.array, reference.array, reference.image.spacing_zyx, args.labels)
    names = {**prediction.names, **reference.names}
    for row in rows:
        row["name"] = names.get(row["label"], "")
    text = {"table": _evaluation_table, "csv": _evaluation_csv, "json": _evaluation_json}[args.format](
        rows, args
    )
    if output is None:
        sys.stdout.write(text)
    else:
        write_text(output, text)
    return 0


def grid_difference(a: io.Image, b: io.Image) -> str | None:
    """What differs between two images' voxel grids (``None`` when they match within NIfTI's precision)."""
    if a.array.shape != b.array.shape:
        return f"shape {a.array.shape} vs {b.array.shape}"
    for what, x, y, atol in (
        ("spacing", a.spacing, b.spacing, 1e-4),
        ("origin", a.origin, b.origin, 1e-4),
        ("direction", np.ravel(a.direction), np.ravel(b.direction), 1e-4),
    ):
        if not np.allclose(x, y, rtol=1e-5, atol=atol):
            return f"{what} {tuple(np.round(x, 4))} vs {tuple(np.round(y, 4))}"
    return None


def _evaluation_table(rows: list[dict], args: argparse.Namespace) -> str:
    body = [
        [
            r["label"],
            r["name"],
            f"{r['dice']:.4f}",
            f"{r['iou']:.4f}",
            _number(r["hd95"], 2),
            r["pred_voxels"],
            r["ref_voxels"],
            _number(r["pred_ml"], 2),
            _number(r["ref_ml"], 2),
        ]
        for r in rows
    ]
    headers = ["label", "name", "Dice", "IoU", "HD95 mm", "pred vox", "ref vox", "pred mL", "ref mL"]
    text = text_table(headers, body)
    if rows:
        text += f"mean Dice {np.mean([r['dice'] for r in rows]):.4f} over {len(rows)} labels\n"
    return text


def _evaluation_csv(rows: list[dict], args: argparse.Namespace) -> str:
    buffer = text_io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=EVALUATION_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r[k] is None else r[k] for k in EVALUATION_COLUMNS})
    return buffer.getvalue()


def _evaluation_json(rows: list[dict], args: argparse.Namespace) -> str:
    # JSON has no infinity: an HD95 with one mask empty is written as null.
    clean = [
        {k: (None if isinstance(r[k], float) and math.isinf(r[k]) else r[k]) for k in EVALUATION_COLUMNS}
        for r in rows
    ]
    document = {
        "prediction": str(args.prediction),
        "reference": str(args.reference),
        "hd95_unit": "mm",
        "labels": clean,
    }
    return json.dumps(document, indent=2) + "\n"


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else "inf" if math.isinf(value) else f"{value:.{digits}f}"


# ----------------------------------------------------------------------------------------------- models


def list_models(args: argparse.Namespace) -> int:
    rows = models.list_models()
    if args.json:
        document = {"cache_dir": str(models.cache_dir()), "models": [r._asdict() for r in rows]}
        print(json.dumps(document, indent=2))
        return 0
    headers = ["name", "preset", "image size", "size", "licence", "digest", "cached"]
    body = [
        [r.name, r.preset, r.image_size, r.size, r.licence, r.digest, "yes" if r.cached else "no"]
        for r in rows
    ]
    sys.stdout.write(text_table(headers, body))
    print(f"cache folder: {models.cache_dir()} (set ${models.CACHE_ENV} to change it)")
    return 0


# ------------------------------------------------------------------------------------------------ bench


def run_bench(args: argparse.Namespace) -> int:
    outputs = [(args.json, (".json",), "--json"), (args.markdown, (".md",), "--markdown")]
    targets = {flag: check_output(path, suffixes, flag) for path, suffixes, flag in outputs if path}
    resolve_device(args.device)
    window = parse_window(args.window)
    memory = MemoryOptions(policy=args.memory)
    image = io.read_image(args.input)
    prompts = volume_prompts(prompt_args(args), image)
    reference = None
    if args.reference:
        values = io.read_labels(args.reference, reference=image).array
        reference = values != 0 if args.reference_label is None else values == args.reference_label
    if args.random:
        model = random_model(model_config(args.random), args.image_size, args.device, args.seed)
        model_name = f"{model.config.name} (random weights)"
    else:
        model = open_model(args.model, model_config(args.config), args.image_size, args.device)
        model_name = args.model
    with progress_bar() as progress:
        report = bench.run(
            model,
            image.array,
            prompts,
            spacing=image.spacing_zyx,
            modality=args.modality,
            window=window,
            memory=memory,
            seed=args.seed,
            reference=reference,
            progress=progress,
            model_name=model_name,
            volume_name=Path(args.input).name,
        )
    headers = list(bench.TABLE_COLUMNS)
    sys.stdout.write(text_table(headers, [[row[h] for h in headers] for row in report.table_rows()]))
    print(report.setup_line())
    if "--json" in targets:
        write_text(targets["--json"], json.dumps(report.as_dict(), indent=2) + "\n")
    if "--markdown" in targets:
        write_text(targets["--markdown"], report.markdown())
    return 0


# --------------------------------------------------------------------------------------------- helpers


def text_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned, text left-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) for row in cells[1:]) and len(cells) > 1 for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines) + "\n"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text in ("-", "")
    return True


def write_text(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file and a rename, so ``path`` is complete or untouched."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
