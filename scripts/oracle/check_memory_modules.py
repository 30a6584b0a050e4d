"""Parity of our memory attention + memory encoder with the official SAM 2 ones (test oracle, run by hand).

    /work/oracle_venv/bin/python scripts/oracle/check_memory_modules.py [--timing-only --threads 1 --repeats 5]

Builds the official ``sam2.modeling`` MemoryAttention (RoPEAttention layers, built with RoPE grids of 64x64 and
of 32x32 as in the current and the older configs) and MemoryEncoder with SAM 2's settings, copies their random
weights into ours (strict load, so the key sets must match), feeds both identical inputs and prints the max abs
difference of every output, plus input and weight gradients for one case. Then times one full-size memory
attention call (64x64 tokens, 7 memory frames + 16 object pointers) of each. Exits 1 above the tolerance.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedSAM2Slicer"))

from sam2.modeling.memory_attention import MemoryAttention as OfficialMemoryAttention  # noqa: E402
from sam2.modeling.memory_attention import MemoryAttentionLayer as OfficialMemoryAttentionLayer  # noqa: E402
from sam2.modeling.memory_encoder import CXBlock as OfficialCXBlock  # noqa: E402
from sam2.modeling.memory_encoder import Fuser as OfficialFuser  # noqa: E402
from sam2.modeling.memory_encoder import MaskDownSampler as OfficialMaskDownSampler  # noqa: E402
from sam2.modeling.memory_encoder import MemoryEncoder as OfficialMemoryEncoder  # noqa: E402
from sam2.modeling.position_encoding import PositionEmbeddingSine as OfficialPositionEmbeddingSine  # noqa: E402
from sam2.modeling.sam.transformer import RoPEAttention as OfficialRoPEAttention  # noqa: E402

from medsam2.model.memory_attention import MemoryAttention, MemoryAttentionLayer, RoPEAttention  # noqa: E402
from medsam2.model.memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder  # noqa: E402
from medsam2.model.position_encoding import PositionEmbeddingSine  # noqa: E402

TOLERANCE = 1e-4
D_MODEL, MEM_DIM = 256, 64
TOKENS_PER_POINTER = D_MODEL // MEM_DIM  # a 256-d object pointer is split into 4 memory tokens


def randomize_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Matrices keep their random init; 1-D parameters (biases, norm scales, layer scales) get noise too, so
    that every parameter influences the outputs."""
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.ndim == 1:
                noise = 0.2 * torch.randn(tensor.shape, generator=generator)
                tensor.copy_(noise + 1.0 if name.endswith("weight") else noise)


def official_memory_attention(feat_side: int) -> OfficialMemoryAttention:
    attention = dict(
        rope_theta=10000.0, feat_sizes=[feat_side, feat_side], embedding_dim=D_MODEL, num_heads=1
    )
    layer = OfficialMemoryAttentionLayer(
        activation="relu",
        cross_attention=OfficialRoPEAttention(
            **attention, rope_k_repeat=True, downsample_rate=1, dropout=0.1, kv_in_dim=MEM_DIM
        ),
        d_model=D_MODEL,
        dim_feedforward=2048,
        dropout=0.1,
        pos_enc_at_attn=False,
        pos_enc_at_cross_attn_keys=True,
        pos_enc_at_cross_attn_queries=False,
        self_attention=OfficialRoPEAttention(**attention, downsample_rate=1, dropout=0.1),
    )
    return OfficialMemoryAttention(d_model=D_MODEL, pos_enc_at_input=True, layer=layer, num_layers=4)


def our_memory_attention() -> MemoryAttention:
    layer = MemoryAttentionLayer(
        self_attention=RoPEAttention(D_MODEL, num_heads=1, dropout=0.1),
        cross_attention=RoPEAttention(
            D_MODEL, num_heads=1, dropout=0.1, kv_in_dim=MEM_DIM, rope_k_repeat=True
        ),
        d_model=D_MODEL,
        dim_feedforward=2048,
        dropout=0.1,
        activation="relu",
    )
    return MemoryAttention(D_MODEL, pos_enc_at_input=True, layer=layer, num_layers=4)


def attention_inputs(side: int, frames: int, pointers: int, batch: int, generator: torch.Generator):
    hw, m = side * side, frames * side * side + pointers * TOKENS_PER_POINTER
    return dict(
        curr=torch.randn(hw, batch, D_MODEL, generator=generator),
        memory=torch.randn(m, batch, MEM_DIM, generator=generator),
        curr_pos=torch.randn(hw, batch, D_MODEL, generator=generator),
        memory_pos=torch.randn(m, batch, MEM_DIM, generator=generator),
        num_obj_ptr_tokens=pointers * TOKENS_PER_POINTER,
    )


def check_memory_attention(generator: torch.Generator) -> float:
    ours = our_memory_attention().eval()
    worst = 0.0
    for feat_side in (64, 32):
        official = official_memory_attention(feat_side).eval()
        if feat_side == 64:
            randomize_(official, generator)
            weights = official.state_dict()
        official.load_state_dict(weights, strict=True)
        ours.load_state_dict(weights, strict=True)
        for side in (64, 32):
            for frames in (1, 2, 7):
                for pointers in (0, 16):
                    batch = 2 if (side, frames) == (32, 2) else 1
                    inputs = attention_inputs(side, frames, pointers, batch, generator)
                    with torch.no_grad():
                        expected = official(**inputs)
                        got = ours(**inputs)
                    diff = (got - expected).abs().max().item()
                    worst = max(worst, diff)
                    print(
                        f"memory attention  rope grid {feat_side:2d}  input {side}x{side} batch {batch}  "
                        f"{frames} frame(s) + {pointers:2d} pointers  max|diff| {diff:.2e}  "
                        f"(|out| max {expected.abs().max().item():.2f})"
                    )
    return max(worst, check_attention_gradients(ours, official, generator))


def check_attention_gradients(ours: MemoryAttention, official: OfficialMemoryAttention, generator) -> float:
    """Input and weight gradients agree too (the small default model trains this module).

    In float64: in float32 both implementations are about 1e-2 (relative) away from the float64 gradients,
    because a few ReLU inputs near zero flip sign with rounding, so float32 results cannot be compared tightly.
    """
    inputs = attention_inputs(32, 2, 16, 1, generator)
    grads = []
    for model in (copy.deepcopy(official).double(), copy.deepcopy(ours).double()):
        leaves = {k: v.double().requires_grad_(True) for k, v in inputs.items() if torch.is_tensor(v)}
        out = model(**leaves, num_obj_ptr_tokens=inputs["num_obj_ptr_tokens"])
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        (out * weights).sum().backward()
        named = {f"input {k}": v.grad for k, v in leaves.items()}
        named.update({f"weight {k}": p.grad for k, p in model.named_parameters()})
        grads.append(named)
    worst = 0.0
    for name, expected in grads[0].items():
        scale = expected.abs().max().item()
        worst = max(worst, (grads[1][name] - expected).abs().max().item() / max(scale, 1e-12))
    print(f"memory attention  float64 gradients of {len(grads[0])} tensors  max relative |diff| {worst:.2e}")
    return worst


def check_memory_encoder(generator: torch.Generator) -> float:
    official = OfficialMemoryEncoder(
        out_dim=MEM_DIM,
        mask_downsampler=OfficialMaskDownSampler(kernel_size=3, stride=2, padding=1),
        fuser=OfficialFuser(
            OfficialCXBlock(
                dim=D_MODEL, kernel_size=7, padding=3, layer_scale_init_value=1e-6, use_dwconv=True
            ),
            num_layers=2,
        ),
        position_encoding=OfficialPositionEmbeddingSine(
            num_pos_feats=MEM_DIM, normalize=True, scale=None, temperature=10000
        ),
        in_dim=D_MODEL,
    ).eval()
    ours = MemoryEncoder(
        out_dim=MEM_DIM,
        mask_downsampler=MaskDownSampler(kernel_size=3, stride=2, padding=1),
        fuser=Fuser(CXBlock(D_MODEL, kernel_size=7, padding=3, layer_scale_init_value=1e-6), num_layers=2),
        position_encoding=PositionEmbeddingSine(MEM_DIM),
        in_dim=D_MODEL,
    ).eval()
    randomize_(official, generator)
    ours.load_state_dict(official.state_dict(), strict=True)
    worst = 0.0
    for side, batch, skip_sigmoid in ((64, 2, False), (32, 1, True), (32, 1, False)):
        pix_feat = torch.randn(batch, D_MODEL, side, side, generator=generator)
        masks = 10 * torch.randn(batch, 1, 16 * side, 16 * side, generator=generator)
        if skip_sigmoid:  # binarized mask scaled as the tracker does (x 20 - 10)
            masks = (masks > 0).float() * 20 - 10
        with torch.no_grad():
            expected = official(pix_feat, masks, skip_mask_sigmoid=skip_sigmoid)
            got = ours(pix_feat, masks, skip_mask_sigmoid=skip_sigmoid)
        for key, exp, out in (
            ("vision_features", expected["vision_features"], got["vision_features"]),
            ("vision_pos_enc", expected["vision_pos_enc"][0], got["vision_pos_enc"][0]),
        ):
            if out.shape != exp.shape:
                print(f"memory encoder  {key} shape {tuple(out.shape)} != official {tuple(exp.shape)}")
                return float("inf")
            diff = (out - exp).abs().max().item()
            worst = max(worst, diff)
            print(
                f"memory encoder  feat {side}x{side} batch {batch}  skip_mask_sigmoid={skip_sigmoid!s:5}  "
                f"{key:15s} max|diff| {diff:.2e}  (|out| max {exp.abs().max().item():.2f})"
            )
    return worst


def time_memory_attention(generator: torch.Generator, repeats: int = 3) -> None:
    """Process CPU time is reported next to wall time: it is far less disturbed by other jobs on the machine."""
    official = official_memory_attention(64).eval()
    randomize_(official, generator)
    ours = our_memory_attention().eval()
    ours.load_state_dict(official.state_dict(), strict=True)
    inputs = attention_inputs(64, 7, 16, 1, generator)
    times: dict[str, list[tuple[float, float]]] = {"official": [], "ours": []}
    with torch.no_grad():
        official(**inputs), ours(**inputs)  # warm-up (caches, allocator)
        for _ in range(repeats):  # interleaved, so that machine load hits both alike
            for name, model in (("official", official), ("ours", ours)):
                cpu, wall = time.process_time(), time.perf_counter()
                model(**inputs)
                times[name].append((time.process_time() - cpu, time.perf_counter() - wall))
    print(
        f"timing: memory attention 64x64, 7 frames + 16 pointers, {torch.get_num_threads()} threads, {repeats} runs"
    )
    for name, runs in times.items():
        cpu, wall = [r[0] for r in runs], [r[1] for r in runs]
        print(
            f"  {name:8s} CPU min {min(cpu):.2f} s median {statistics.median(cpu):.2f} s   "
            f"wall min {min(wall):.2f} s median {statistics.median(wall):.2f} s"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--timing-only", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per implementation")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads for the timing")
    opts = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    if not opts.timing_only:
        worst = max(check_memory_attention(generator), check_memory_encoder(generator))
    if not opts.no_timing:
        if opts.threads:
            torch.set_num_threads(opts.threads)
        time_memory_attention(generator, opts.repeats)
    if opts.timing_only:
        return 0
    ok = worst <= TOLERANCE
    print(f"worst max|diff| {worst:.2e}  tolerance {TOLERANCE:.0e}  -> {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
