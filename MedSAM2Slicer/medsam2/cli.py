"""The ``medsam2`` command line: segment volumes and images, evaluate results, list models, benchmark.

Only the argument parser lives here; the work is done in ``commands.py`` (and ``cli_inputs.py``,
``preview.py``, ``bench.py``). Bad input ends the command with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__, commands
from .cli_inputs import AXES
from .cohort import command as cohort_command
from .errors import Cancelled, MedSAM2Error
from .preprocess import MODALITIES, WINDOW_PRESETS
from .volume import Aggregation

DEFAULT_MODEL = "medsam2-lite"
# Subcommands whose arguments belong to another module: ``medsam2 <name> ARGS`` calls ``medsam2.<name>.main``.
FORWARDED = {
    "demo": "segment a structure of the bundled chest CT from one box, offline, and score it",
    "train": "train the memory modules of a model (medsam2.train)",
    "serve": "run the engine as an HTTP service for Slicer, the CLI and Python clients (medsam2.service)",
}
# Forwarded subcommands whose module is not medsam2.<name>.
FORWARDED_MODULES = {"serve": "medsam2.service.serve"}

SEGMENT_EPILOG = """\
coordinates:
  By default --point and --box are voxel coordinates on slice --slice along --axis: x is the column and
  y the row of that slice, as an image viewer shows the array (axial: x = i, y = j; coronal: x = i, y = k;
  sagittal: x = j, y = k). The axes follow the voxel grid, also for oblique images. With --world they are
  physical x,y,z in mm (LPS, as SimpleITK and ITK-SNAP report them; RAS from Slicer: negate x and y), and
  the slice is the one the point (or the centre of the box) falls on.

examples:
  medsam2 segment ct.nii.gz -o liver.nii.gz --slice 60 --box 120,80,210,170
  medsam2 segment ct.nrrd -o lesion.seg.nrrd --slice 40 --point 200,150 --point 230,160,0 \\
      --orientations 2 --preview lesion.png
  medsam2 segment ct_dicom_folder/ -o out.nrrd --world --point -12.5,40.2,-310
  medsam2 segment mr.nii.gz -o tumour.nii.gz --mask first_slice.nii.gz --modality mr --device cuda
  medsam2 segment ct.nii.gz -o out.nii.gz --slice 30 --box 10,10,60,60 --model MedSAM2_latest
  medsam2 segment ct.nii.gz -o out.nii.gz --slice 30 --box 10,10,60,60 --server http://gpu-box:8765 \\
      --token-file ~/.medsam2-token
"""

IMAGES_EPILOG = """\
examples:
  medsam2 images photos/ -o masks/ --template case01.png --box 30,40,120,150
  medsam2 images slides/ -o masks/ --template ref --point 64,80 --preview sheet.png
  medsam2 images xrays/ -o masks/ --template xr001.png --mask xr001_mask.png

Each image gets a mask OUTDIR/<name>.png (0 = background, 255 = object) of its own size.
"""

EVALUATE_EPILOG = """\
PRED and REF are label maps (NIfTI, NRRD, MHA or Slicer .seg.nrrd) of the same voxel grid; a .seg.nrrd
gives its segment names. HD95 is in mm from REF's spacing; volumes are in mL. A prediction on another grid
is refused unless --resample is given (nearest neighbour onto REF's grid). In JSON, an HD95 with one mask
empty (infinite) is null.

examples:
  medsam2 evaluate pred.nii.gz ref.seg.nrrd
  medsam2 evaluate pred.nii.gz ref.nii.gz --labels 1 3 --format csv -o scores.csv
"""

BENCH_EPILOG = """\
runs: (a) prompt axis one direction, (b) prompt axis both directions, (c) six orientations over the whole
volume without early stop, (d) six orientations with ROI and early stop (the default). Each is compared
with run (c) and with the image-encoder-only time for as many frames as it encoded (its floor).

examples:
  medsam2 bench ct.nrrd --slice 20 --box 40,40,90,90 --random sam2.1_hiera_t --image-size 512
  medsam2 bench ct.nrrd --mask ref.seg.nrrd --mask-label 5 --reference ref.seg.nrrd --reference-label 5 \\
      --model MedSAM2_latest --device cuda --markdown bench.md --json bench.json
"""


_WINDOW_HELP = f"CT window: {', '.join(WINDOW_PRESETS)}, or LEVEL,WIDTH in HU (default for CT: abdomen)"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="medsam2",
        description="Medical SAM 2: segment a structure through a volume (or a set of images) from one prompt.",
        epilog="Run 'medsam2 COMMAND --help' for the options and examples of each command.",
    )
    parser.add_argument("--version", action="version", version=f"medsam2 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    _add_segment(sub)
    _add_images(sub)
    _add_evaluate(sub)
    _add_models(sub)
    _add_bench(sub)
    _add_cohort(sub)
    for name, text in FORWARDED.items():  # listed for --help; main() hands their arguments on untouched
        sub.add_parser(name, help=text, add_help=False)
    return parser


def _add_segment(sub: argparse._SubParsersAction) -> None:
    segment = sub.add_parser(
        "segment",
        help="segment one structure through a volume from a prompt on one slice",
        description="Segment one structure through a 3D image from a box, clicks or a mask on one slice.",
        epilog=SEGMENT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    segment.add_argument("input", metavar="INPUT", help="volume file (NIfTI, NRRD, MHA) or DICOM folder")
    segment.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUTPUT",
        help="label map to write on INPUT's grid: .nii.gz, .nii, .nrrd, .mha or .seg.nrrd",
    )
    _prompt_options(segment, volume=True)
    _volume_options(segment)
    segment.add_argument(
        "--threshold",
        type=float,
        metavar="P",
        help="probability cut-off of the written mask (default: the engine's, 0.5)",
    )
    segment.add_argument("--preview", metavar="PNG", help="also write a picture of the prompt and the result")
    _model_options(segment)
    segment.set_defaults(handler=commands.segment)


def _add_images(sub: argparse._SubParsersAction) -> None:
    images = sub.add_parser(
        "images",
        help="segment the same structure in a folder of 2D images from one prompted template",
        description="One-prompt segmentation: prompt one template image; segment the same structure in "
        "every image of the folder (PNG, JPEG, BMP, TIFF).",
        epilog=IMAGES_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    images.add_argument("folder", metavar="FOLDER", help="folder of 2D images")
    images.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for the mask PNGs")
    images.add_argument(
        "--template", required=True, metavar="NAME", help="file name of the prompted image in FOLDER"
    )
    _prompt_options(images, volume=False)
    images.add_argument(
        "--memory",
        choices=("self-sorting", "recent"),
        default="self-sorting",
        help="memory bank policy (default: self-sorting)",
    )
    images.add_argument("--preview", metavar="PNG", help="also write a contact sheet of images and masks")
    _model_options(images)
    images.set_defaults(handler=commands.images)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    evaluate = sub.add_parser(
        "evaluate",
        help="Dice, IoU and HD95 of a prediction against a reference, per label",
        description="Per-label Dice, IoU, HD95 (mm) and volumes (mL) of a predicted label map against a "
        "reference label map.",
        epilog=EVALUATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("prediction", metavar="PRED", help="predicted label map")
    evaluate.add_argument("reference", metavar="REF", help="reference label map")
    evaluate.add_argument(
        "--labels",
        type=int,
        nargs="+",
        metavar="N",
        help="label values to score (default: every non-zero value in either)",
    )
    evaluate.add_argument("--format", choices=("table", "csv", "json"), default="table")
    evaluate.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of the screen")
    evaluate.add_argument(
        "--resample", action="store_true", help="resample PRED onto REF's grid when the grids differ"
    )
    evaluate.set_defaults(handler=commands.evaluate)


def _add_models(sub: argparse._SubParsersAction) -> None:
    listing = sub.add_parser(
        "models",
        help="list the registered models and whether they are downloaded",
        description="The registry of named checkpoints: --model accepts these names (or a file).",
    )
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=commands.list_models)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench",
        help="time the orientation, ROI and early-stop settings on one volume",
        description="Time segment_volume on one volume and prompt in four settings, against the "
        "image-encoder-only floor.",
        epilog=BENCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("input", metavar="INPUT", help="volume file or DICOM folder")
    _prompt_options(bench, volume=True)
    bench.add_argument("--modality", choices=MODALITIES, default="auto")
    bench.add_argument("--window", metavar="NAME|LEVEL,WIDTH", help=_WINDOW_HELP)
    bench.add_argument("--memory", choices=("self-sorting", "recent"), default="self-sorting")
    bench.add_argument("--reference", metavar="FILE", help="reference label map: adds each run's Dice")
    bench.add_argument("--reference-label", type=int, metavar="N", help="label of --reference (default: any)")
    _model_options(bench)
    bench.add_argument(
        "--random",
        metavar="PRESET|JSON",
        help="time a model of this configuration with random weights instead of loading --model",
    )
    bench.add_argument("--json", metavar="FILE", help="write the measurements as JSON")
    bench.add_argument("--markdown", metavar="FILE", help="write a BENCHMARKS.md section")
    bench.set_defaults(handler=commands.run_bench)


def _add_cohort(sub: argparse._SubParsersAction) -> None:
    cohort = sub.add_parser(
        "cohort",
        help=cohort_command.HELP,
        description=cohort_command.DESCRIPTION,
        epilog=cohort_command.epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cohort_command.add_arguments(cohort)
    cohort.set_defaults(handler=cohort_command.run)


def _prompt_options(parser: argparse.ArgumentParser, volume: bool) -> None:
    group = parser.add_argument_group("prompt")
    where = "voxel column,row on --slice" if volume else "pixel column,row of the template"
    in_mm = {
        "box": "; with --world: two corners x,y,z,x,y,z in mm",
        "point": "; with --world: x,y,z[,L] in mm",
    }
    if not volume:
        in_mm = {"box": "", "point": ""}
    group.add_argument("--box", metavar="X0,Y0,X1,Y1", help=f"a box ({where}{in_mm['box']})")
    group.add_argument(
        "--point",
        action="append",
        metavar="X,Y[,L]",
        help=f"a click ({where}{in_mm['point']}); L = 1 include (default), 0 exclude; repeatable",
    )
    group.add_argument(
        "--mask",
        metavar="FILE",
        help="mask prompt: a label volume on INPUT's grid (its voxels on --slice; default: the slice where "
        "it is largest) or a 2D mask of one slice"
        if volume
        else "mask prompt: a 2D mask of the template",
    )
    group.add_argument("--mask-label", type=int, metavar="N", help="use the voxels of label N (default: any)")
    if volume:
        group.add_argument("--slice", type=int, metavar="K", help="index of the prompted slice along --axis")
        group.add_argument(
            "--axis",
            choices=tuple(AXES),
            default="axial",
            help="slice direction of the prompt (default: axial = the file's slices)",
        )
        group.add_argument(
            "--absent",
            action="append",
            type=int,
            metavar="K",
            help="a slice along --axis where the object is not: it is not carried across it; repeatable",
        )
        group.add_argument(
            "--world",
            action="store_true",
            help="--point/--box are physical x,y,z in mm (LPS); the slice follows from them",
        )
        group.add_argument(
            "--obj-id",
            type=int,
            default=1,
            metavar="N",
            help="label value of the object in the output (default: 1)",
        )


def _volume_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("segmentation")
    group.add_argument(
        "--pipeline",
        choices=("default", "upstream"),
        default="default",
        help="default: this project's pipeline; upstream: bowang-lab MedSAM2's own inference, for comparing "
        "with its published numbers (their preprocessing, prompt axis only, SAM 2 memory; the options "
        "below except --modality and --window do not apply)",
    )
    group.add_argument(
        "--orientations",
        type=int,
        choices=(1, 2, 6),
        default=6,
        help="1: prompt axis forward; 2: both directions; 6: all three axes (default)",
    )
    group.add_argument(
        "--aggregate",
        choices=[a.value for a in Aggregation],
        default=Aggregation.CONFIDENCE.value,
        help="how the orientations vote (default: confidence, the mean probability with each axis weighted "
        "by the model's mean predicted IoU on it)",
    )
    group.add_argument(
        "--memory",
        choices=("self-sorting", "recent"),
        default="self-sorting",
        help="memory bank: MedSAM-2's self-sorting bank (default) or SAM 2's recent frames",
    )
    group.add_argument(
        "--modality",
        choices=MODALITIES,
        default="auto",
        help="intensity handling: CT window or percentile clipping (default: guessed)",
    )
    group.add_argument("--window", metavar="NAME|LEVEL,WIDTH", help=_WINDOW_HELP)
    group.add_argument(
        "--no-roi",
        action="store_true",
        help="let the extra axes visit every slice (slower; default: the slices around the object)",
    )


def _model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="NAME|PATH",
        help=f"registered model (see 'medsam2 models') or checkpoint file (default: {DEFAULT_MODEL})",
    )
    group.add_argument(
        "--config",
        metavar="PRESET|JSON",
        help="configuration of a checkpoint file: a preset such as sam2.1_hiera_t, or a JSON file of "
        "ModelConfig fields (default: detected from the file)",
    )
    group.add_argument("--image-size", type=int, metavar="S", help="model input size (default: the model's)")
    group.add_argument(
        "--device",
        default="auto",
        metavar="auto|cpu|cuda|mps",
        help="where to run (default: auto = CUDA, then MPS, then CPU)",
    )
    group.add_argument("--seed", type=int, default=0, help="seed of the memory bank's sampling (default: 0)")
    server = parser.add_argument_group("engine server (run on another computer; see 'medsam2 serve')")
    server.add_argument(
        "--server", metavar="URL", help="run on the engine server at URL, e.g. http://gpu:8765"
    )
    server.add_argument(
        "--token-file", metavar="FILE", help="the server's token (default: $MEDSAM2_SERVER_TOKEN)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0 success, 2 bad input, 1 a file could not be written)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FORWARDED:
        return _forward(argv[0], argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version or a usage error, already printed
        return int(done.code or 0)
    return _guarded(f"medsam2 {args.command}", lambda: args.handler(args))


def _forward(command: str, argv: list[str]) -> int:
    module_name = FORWARDED_MODULES.get(command, f"medsam2.{command}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = (
            f"this installation has no {module_name} module"
            if error.name == module_name
            else f"it needs the Python package {error.name!r}, which is not installed"
        )
        print(f"medsam2 {command}: error: {missing}", file=sys.stderr)
        return 2
    entry = getattr(module, "main", None)
    if entry is None:
        print(f"medsam2 {command}: error: {module_name} has no main(argv) to run", file=sys.stderr)
        return 2
    try:
        return _guarded(f"medsam2 {command}", lambda: entry(argv))
    except SystemExit as done:  # the module's own parser ended it (--help or a usage error)
        return int(done.code or 0) if not isinstance(done.code, str) else 2


def _guarded(prog: str, work) -> int:
    try:
        return int(work() or 0)
    except (Cancelled, KeyboardInterrupt):
        print(f"{prog}: interrupted; no output was written", file=sys.stderr)
        return 130
    except MedSAM2Error as error:
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
