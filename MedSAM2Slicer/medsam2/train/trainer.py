"""The training loop: which parameters learn, the optimiser and schedule, exact-resume checkpoints, logs.

Frozen (their outputs are cached or fixed): LiteMedSAM's TinyViT image encoder, its prompt encoder, and its
mask decoder except the object-score head that LiteMedSAM lacks; also the no-memory embedding, kept at zero
so that a prompted frame without memory gives LiteMedSAM's answer, and the object-score token, kept at zero:
it takes part in the decoder's token attention, so any other value moves LiteMedSAM's masks (measured on a
CTChest4 slice: random token, largest logit change 23 and 96 % of a coarse grid agreeing; zero token, 3 and
99 %; trained along with the memory for 300 steps, ground-truth-box Dice on a held-out kidney fell from 0.95
to 0.85). The head reads the zero token's output, which still attends to the image and the prompt. Everything else
learns: memory attention, memory encoder, object-pointer projections, temporal encodings, the no-object
embeddings and the mask-prompt downsampler. With ``train_decoder`` the rest of the decoder is fine-tuned too,
at ``decoder_lr_scale`` times the learning rate.

Fresh modules start as an identity: the memory attention's residual branches (attention output projections
and the second feedforward layer) are zero and its final LayerNorm takes the affine parameters of TinyViT's
last LayerNorm, so before training a tracked frame's embedding is almost the raw image embedding; with pooled
attention its change is also scaled by ``memory_attention_scale``, which starts at zero, so the embedding is
exactly the raw one (the final LayerNorm alone would move it). The object-score head starts near "present"
(``INITIAL_OBJECT_LOGIT``). Before training, the model therefore tracks as LiteMedSAM does with the previous
slice's box.

A checkpoint holds the trainable tensors, the optimiser and scheduler state, the step, and the numpy and
torch generator states; resuming from it gives exactly the losses an uninterrupted run would give (on CPU).

With a validator (:mod:`.validation`) and ``validate_every``, the run is scored at its start, every
``validate_every`` steps and at its last step (``validation.jsonl``); the best-scoring trainable tensors so far
are kept in ``best.pt`` and the checkpoint records which step that was. Validation leaves the model and the
random generators as they were, so a run with it trains exactly as one without it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..configs import ModelConfig
from ..model.build import build_model
from ..model.sam2 import SAM2Model
from .sequences import SequenceSampler
from .step import run_sequence

_NEW_DECODER_PARTS = ("sam_mask_decoder.pred_obj_score_head.",)
# The presence head is fitted on its own, after training (medsam2.train.presence).
_FROZEN_PREFIXES = (
    "image_encoder.",
    "sam_prompt_encoder.",
    "sam_mask_decoder.",
    "no_mem_embed",
    "presence_head.",
)
# The new object-score head starts out calling every object present (sigmoid(3) = 0.95), the decoder's own
# behaviour, and learns from there when an object has ended.
INITIAL_OBJECT_LOGIT = 3.0


@dataclass(frozen=True)
class TrainOptions:
    steps: int = 1000
    lr: float = 3e-4
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    train_decoder: bool = False
    decoder_lr_scale: float = 0.1
    checkpoint_every: int = 10
    # Score the run on the validation volume every this many steps (0: never).
    validate_every: int = 0
    seed: int = 0
    # Trained medsam2-lite weights to start from instead of the identity start (recorded for provenance).
    init_weights: str | None = None


def trainable_names(model: nn.Module, train_decoder: bool) -> list[str]:
    """Names of the parameters that learn (see the module docstring)."""
    names = []
    for name, _ in model.named_parameters():
        if (
            name.startswith(_NEW_DECODER_PARTS)
            or train_decoder
            and name.startswith("sam_mask_decoder.")
            or not name.startswith(_FROZEN_PREFIXES)
        ):
            names.append(name)
    return names


def init_fresh_parts(model: SAM2Model) -> None:
    """Identity start for the memory attention, a zero no-memory embedding, an object-score head that says
    "present" (see the module docstring)."""
    with torch.no_grad():
        for layer in model.memory_attention.layers:
            for proj in (layer.self_attn.out_proj, layer.cross_attn_image.out_proj, layer.linear2):
                proj.weight.zero_()
                proj.bias.zero_()
        last_norm = getattr(model.image_encoder, "trunk", None)
        last_norm = getattr(last_norm, "neck", [None])[-1] if last_norm is not None else None
        if last_norm is not None and hasattr(last_norm, "weight"):
            model.memory_attention.norm.weight.copy_(last_norm.weight)
            model.memory_attention.norm.bias.copy_(last_norm.bias)
        model.no_mem_embed.zero_()
        if model.memory_attention_scale is not None:
            model.memory_attention_scale.zero_()
        model.sam_mask_decoder.obj_score_token.weight.zero_()
        head = model.sam_mask_decoder.pred_obj_score_head
        last = head.layers[-1] if hasattr(head, "layers") else head
        last.weight.mul_(0.1)
        last.bias.fill_(INITIAL_OBJECT_LOGIT)


def lr_factor(step: int, options: TrainOptions) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``options.steps``."""
    if step < options.warmup_steps:
        return (step + 1) / options.warmup_steps
    progress = min(1.0, (step - options.warmup_steps) / max(1, options.steps - options.warmup_steps))
    return options.min_lr_ratio + (1 - options.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """Trains ``model`` on sequences from ``sampler``; ``workdir`` holds ``checkpoint.pt`` and ``log.jsonl``.

    ``model`` must already hold the pretrained weights (``init_fresh_parts`` is applied by the caller for a
    fresh run). Call :meth:`resume` to continue from the checkpoint in ``workdir`` if there is one.
    """

    def __init__(
        self,
        model: SAM2Model,
        sampler: SequenceSampler,
        options: TrainOptions,
        workdir: str | os.PathLike,
        log: Callable[[str], None] | None = None,
        validator: Callable[[SAM2Model], dict] | None = None,
    ) -> None:
        if options.validate_every and validator is None:
            raise ValueError("validate_every is set but no validator was given")
        self.model = model
        self.validator = validator
        # {"step": n, "score": s} of the best validation so far (None: none yet).
        self.best: dict | None = None
        self.sampler = sampler
        self.options = options
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.print = log or (lambda message: None)
        names = set(trainable_names(model, options.train_decoder))
        for name, p in model.named_parameters():
            p.requires_grad_(name in names)
        self.trainable = {n: p for n, p in model.named_parameters() if n in names}
        decoder = [p for n, p in self.trainable.items() if n.startswith("sam_mask_decoder.")]
        others = [p for n, p in self.trainable.items() if not n.startswith("sam_mask_decoder.")]
        new_decoder = [p for n, p in self.trainable.items() if n.startswith(_NEW_DECODER_PARTS)]
        old_decoder = [p for p in decoder if all(p is not q for q in new_decoder)]
        groups = [{"params": others + new_decoder, "lr_scale": 1.0}]
        if old_decoder:
            groups.append({"params": old_decoder, "lr_scale": options.decoder_lr_scale})
        for g in groups:
            g["lr"] = options.lr * g["lr_scale"]
        self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=options.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, options)
        )
        self.step = 0
        torch.manual_seed(options.seed)

    @property
    def checkpoint_path(self) -> Path:
        return self.workdir / "checkpoint.pt"

    @property
    def best_path(self) -> Path:
        return self.workdir / "best.pt"

    def _set_modes(self) -> None:
        # Frozen parts stay in eval mode (TinyViT's batch norms); the memory modules train (dropout).
        self.model.eval()
        for module in (self.model.memory_attention, self.model.memory_encoder):
            module.train()

    def train_step(self) -> dict[str, float]:
        """One sequence, one optimiser step; returns the step's loss terms."""
        self._set_modes()
        sequence = self.sampler.sample()
        device = self.model.device
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if device.type == "cuda"
            else torch.autocast("cpu", enabled=False)
        )
        with autocast, _attention_kernels(device):
            totals, _ = run_sequence(self.model, sequence, self.sampler, seed=self.options.seed + self.step)
            loss = totals.total()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), self.options.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        record = totals.means()
        record.update(
            step=self.step,
            lr=self.optimizer.param_groups[0]["lr"],
            grad_norm=float(grad_norm),
            source=sequence.source,
            prompt=sequence.prompt,
            objects=int(sequence.masks.shape[0]),
            memory_only=sequence.memory_only,
        )
        return record

    def run(self, until: int | None = None, deadline: float | None = None, progress: bool = True) -> None:
        """Train to step ``until`` (default ``options.steps``) or wall-clock ``deadline`` (``time.time()``)."""
        from tqdm import tqdm

        until = self.options.steps if until is None else until
        bar = tqdm(total=until, initial=self.step, disable=not progress, desc="train", unit="step")
        if self.options.validate_every and self.step == 0:
            self.validate()  # the starting point, which later steps must beat
        with (self.workdir / "log.jsonl").open("a") as log:
            while self.step < until and (deadline is None or time.time() < deadline):
                start = time.perf_counter()
                record = self.train_step()
                record["seconds"] = round(time.perf_counter() - start, 3)
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", presence=f"{record['presence']:.3f}")
                every = self.options.validate_every
                if every and (self.step % every == 0 or self.step == self.options.steps):
                    self.validate()
                if self.step % self.options.checkpoint_every == 0 or self.step == until:
                    self.save()
        bar.close()
        self.save()

    def validate(self) -> dict:
        """Score the model now; keep its trainable tensors in ``best.pt`` when it is the best so far."""
        record = {"step": self.step, **self.validator(self.model)}
        with (self.workdir / "validation.jsonl").open("a") as log:
            log.write(json.dumps(record) + "\n")
        best = self.best is None or record["score"] > self.best["score"]
        if best:
            self.best = {"step": self.step, "score": record["score"]}
            trainable = {n: p.detach().cpu().clone() for n, p in self.trainable.items()}
            _save_atomic({**self.best, "trainable": trainable}, self.best_path)
        self.print(
            f"validation at step {self.step}: {record['score']:.4f}"
            + (" (best so far)" if best else f" (best {self.best['score']:.4f} at step {self.best['step']})")
        )
        return record

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict:
        return {
            "step": self.step,
            "trainable": {n: p.detach().cpu().clone() for n, p in self.trainable.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "numpy_rng": json.dumps(self.sampler.rng.bit_generator.state),
            "torch_rng": torch.get_rng_state(),
            "options": json.dumps(asdict(self.options)),
            "sampler": json.dumps(asdict(self.sampler.options)),
            "best": json.dumps(self.best),
        }

    def save(self) -> Path:
        return _save_atomic(self.state(), self.checkpoint_path)

    def resume(self) -> bool:
        """Load ``checkpoint.pt`` from the work folder when it exists; returns whether it did. Without one, a
        run with ``options.init_weights`` starts from those weights' trainable tensors."""
        if not self.checkpoint_path.is_file():
            if self.options.init_weights:
                self._load_trained(self.options.init_weights)
            return False
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        self._set_trainable(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.rng.bit_generator.state = json.loads(state["numpy_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        self.best = json.loads(state.get("best", "null"))
        return True

    def _load_trained(self, path: str) -> None:
        from ..checkpoint import read_state_dict

        trained = read_state_dict(path)
        # A shipped file omits what LiteMedSAM provides unchanged: with ``train_decoder``, the decoder's
        # pretrained tensors then start from the LiteMedSAM values the model already holds.
        always_trained = set(trainable_names(self.model, train_decoder=False))
        missing = [n for n in self.trainable if n not in trained and n in always_trained]
        if missing:
            raise ValueError(f"{path} has no {missing[0]} (and {len(missing) - 1} more trainable tensors)")
        self._set_trainable({n: trained.get(n, p.detach()) for n, p in self.trainable.items()})

    def _set_trainable(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy every trainable tensor from ``tensors`` (which may hold more)."""
        with torch.no_grad():
            for name, value in self.trainable.items():
                value.copy_(tensors[name].to(value.dtype))


def _save_atomic(state: dict, path: Path) -> Path:
    tmp = path.with_suffix(".partial")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def _attention_kernels(device: torch.device) -> contextlib.AbstractContextManager:
    """On CPU, attention runs with the plain (math) kernel during training: the CPU flash-attention kernel's
    backward pass measured ~40x slower than its forward on 4096-token maps (torch 2.13)."""
    if device.type != "cpu":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def build_lite_for_training(config: ModelConfig, litemedsam_source: str | os.PathLike | None) -> SAM2Model:
    """``config``'s model with LiteMedSAM's pretrained parts loaded and the fresh parts initialised."""
    from ..lite import litemedsam_to_model_keys
    from ..litemedsam import find_litemedsam_weights, read_litemedsam_state_dict

    model = build_model(config)
    source = litemedsam_source or find_litemedsam_weights()
    pretrained = litemedsam_to_model_keys(read_litemedsam_state_dict(source))
    missing, unexpected = model.load_state_dict(pretrained, strict=False)
    if unexpected:
        raise ValueError(f"LiteMedSAM keys the model does not have: {unexpected[:5]}")
    init_fresh_parts(model)
    return model


def seeded_rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))
