"""Compare our SAM 2 image encoder with the official one (run by hand with the oracle venv).

    /work/oracle_venv/bin/python scripts/oracle/check_image_encoder.py [--no-timing]

Builds the official trunk + neck directly from its classes, fills every parameter with random values, copies
the state dict into ours (strict) and prints the max abs difference of every output tensor, then times both on
the CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedSAM2Slicer"))

from sam2.modeling import position_encoding as official_pe  # noqa: E402
from sam2.modeling.backbones import hieradet as official_hiera  # noqa: E402
from sam2.modeling.backbones import image_encoder as official_encoder  # noqa: E402

from medsam2.model.hiera import Hiera  # noqa: E402
from medsam2.model.image_encoder import FpnNeck, ImageEncoder  # noqa: E402

PRESETS = {
    "tiny": dict(
        embed_dim=96,
        num_heads=1,
        stages=[1, 2, 7, 2],
        global_att_blocks=[5, 7, 9],
        window_pos_embed_bkg_spatial_size=[7, 7],
    ),
    "small": dict(
        embed_dim=96,
        num_heads=1,
        stages=[1, 2, 11, 2],
        global_att_blocks=[7, 10, 13],
        window_pos_embed_bkg_spatial_size=[7, 7],
    ),
    "base_plus": dict(embed_dim=112, num_heads=2),
    "large": dict(
        embed_dim=144,
        num_heads=2,
        stages=[2, 6, 36, 4],
        global_att_blocks=[23, 33, 43],
        window_pos_embed_bkg_spatial_size=[7, 7],
        window_spec=[8, 4, 16, 8],
    ),
    # Small custom trunk: 2 heads, a global block inside stage 3, a non-square background embedding and a
    # stage-4 transition window (6) that does not divide the stage-3 grid at 128 / 160 px, so it is padded.
    "custom": dict(
        embed_dim=16,
        num_heads=2,
        stages=[1, 2, 2, 1],
        global_att_blocks=[4],
        window_pos_embed_bkg_spatial_size=[3, 5],
        window_spec=[4, 2, 6, 3],
    ),
}


def channel_list(trunk_args: dict) -> list[int]:
    c = trunk_args["embed_dim"]
    return [c * 8, c * 4, c * 2, c]


def build_official(trunk_args: dict) -> torch.nn.Module:
    trunk = official_hiera.Hiera(**trunk_args)
    neck = official_encoder.FpnNeck(
        position_encoding=official_pe.PositionEmbeddingSine(
            num_pos_feats=256, normalize=True, temperature=10000
        ),
        d_model=256,
        backbone_channel_list=channel_list(trunk_args),
        fpn_top_down_levels=[2, 3],
        fpn_interp_model="nearest",
    )
    return official_encoder.ImageEncoder(trunk=trunk, neck=neck, scalp=1).eval()


def build_ours(trunk_args: dict) -> torch.nn.Module:
    neck = FpnNeck(d_model=256, backbone_channel_list=channel_list(trunk_args), fpn_top_down_levels=[2, 3])
    return ImageEncoder(trunk=Hiera(**trunk_args), neck=neck, scalp=1).eval()


def randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm1.weight") or name.endswith("norm2.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(noise / fan_in**0.5)
            else:
                p.copy_(0.1 * noise)


def flatten(out: dict) -> dict[str, torch.Tensor]:
    flat = {"vision_features": out["vision_features"]}
    for key in ("vision_pos_enc", "backbone_fpn"):
        for i, t in enumerate(out[key]):
            flat[f"{key}[{i}]"] = t
    return flat


def compare(name: str, size: int, seed: int = 0) -> float:
    args = PRESETS[name]
    official, ours = build_official(args), build_ours(args)
    randomize(official, seed)
    ours.load_state_dict(official.state_dict(), strict=True)
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    with torch.inference_mode():
        ref, got = flatten(official(image)), flatten(ours(image))
        trunk_ref, trunk_got = official.trunk(image), ours.trunk(image)
    assert ref.keys() == got.keys()
    worst = 0.0
    parts = []
    for i, (a, b) in enumerate(zip(trunk_ref, trunk_got, strict=True)):
        assert a.shape == b.shape, (a.shape, b.shape)
        diff = (a - b).abs().max().item()
        worst = max(worst, diff)
        parts.append(f"trunk[{i}] {tuple(a.shape[1:])} {diff:.2e} (|ref| max {a.abs().max().item():.1f})")
    for key in ref:
        a, b = ref[key], got[key]
        assert a.shape == b.shape and a.dtype == b.dtype, (key, a.shape, b.shape)
        diff = (a - b).abs().max().item()
        worst = max(worst, diff)
        parts.append(f"{key} {tuple(a.shape[1:])} {diff:.2e}")
    print(f"[{name} @ {size}] max abs diff {worst:.3e}")
    for p in parts:
        print("    " + p)
    return worst


def check_parity(all_presets: bool) -> None:
    worst = 0.0
    for name in ("tiny", "custom"):
        for size in (1024, 512, 128):
            worst = max(worst, compare(name, size))
    for size in (160, 96):  # odd stride-32 grids (5x5, 3x3)
        worst = max(worst, compare("custom", size))
    if all_presets:
        for name in ("small", "base_plus", "large"):
            worst = max(worst, compare(name, 128))
    print(f"OVERALL max abs diff {worst:.3e} -> {'PASS' if worst <= 1e-4 else 'FAIL'} (target 1e-4)")


def run_timed(model: torch.nn.Module, image: torch.Tensor) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one forward pass."""
    wall, cpu = time.perf_counter(), time.process_time()
    model(image)
    return time.perf_counter() - wall, time.process_time() - cpu


def timing(size: int, repeats: int) -> None:
    args = PRESETS["tiny"]
    official, ours = build_official(args), build_ours(args)
    randomize(official, 0)
    ours.load_state_dict(official.state_dict(), strict=True)
    image = torch.randn(1, 3, size, size)
    times: dict[str, list[tuple[float, float]]] = {"official": [], "ours": []}
    with torch.inference_mode():
        official(image), ours(image)  # warm-up
        # Alternate the two so that load from other processes hits both alike; report the best run.
        for _ in range(repeats):
            times["official"].append(run_timed(official, image))
            times["ours"].append(run_timed(ours, image))
    summary = ", ".join(
        f"{name} {min(w for w, _ in runs) * 1000:.0f} ms wall / {min(c for _, c in runs) * 1000:.0f} ms CPU"
        for name, runs in times.items()
    )
    print(f"[timing tiny @ {size}, {torch.get_num_threads()} threads, best of {repeats}] {summary}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--timing-only", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model and size")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads for the timing")
    parser.add_argument(
        "--all-presets", action="store_true", help="also check small, base_plus, large at 128"
    )
    opts = parser.parse_args()
    if opts.timing_only:
        opts.no_timing = False
    else:
        check_parity(opts.all_presets)
    if not opts.no_timing:
        if opts.threads:
            torch.set_num_threads(opts.threads)
        timing(512, repeats=opts.repeats)
        timing(1024, repeats=opts.repeats)


if __name__ == "__main__":
    main()
