"""Write the golden files of the upstream-pipeline parity test with bowang-lab's MedSAM2 code as the oracle.

Run by hand, never in CI, in a throwaway environment outside the repository:

    python3 -m venv /tmp/oracle && /tmp/oracle/bin/pip install torch==2.13.0 numpy pillow scipy scikit-image
    /tmp/oracle/bin/pip install hydra-core iopath tqdm && /tmp/oracle/bin/pip install --no-deps sam2==1.1.0
    git clone https://github.com/bowang-lab/MedSAM2 /tmp/MedSAM2          # its own sam2 package (the NPZ predictor)
    PYTHONPATH=/tmp/MedSAM2 /tmp/oracle/bin/python scripts/oracle/make_upstream_golden.py   # Testing/data/upstream/

It builds their video predictor exactly as their 3D inference scripts do (``build_sam2_video_predictor_npz``
with ``sam2.1_hiera_t512.yaml``: hole filling of 8 px, masks from prompts binarised for memory, dynamic
multimask), loads the random SAM 2.1 tiny weights of ``Testing/upstream_golden.py`` strictly, and follows the
steps of their ``medsam2_infer_3D_CT.py`` (CT; the MR case prepares intensities as their
``examples/infer_CT_LUNA25.py`` does for non-CT) on small generated volumes: intensity preparation, 8-bit RGB
resize to 512 px with Pillow, ImageNet normalisation, prompt, forward propagation, reset, prompt again,
reverse propagation, union, largest connected component.

Two stand-ins, both needed to run their code on a CPU in float32:
- their connected-components CUDA kernel (used by the hole filling) is replaced by scikit-image's 8-connected
  labelling, which computes the same labels and areas;
- memory features are kept in float32 where their predictor casts them to bfloat16 (on CUDA they run under
  bfloat16 autocast; on a CPU without autocast the bfloat16 features cannot meet the float32 weights).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import measure

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "Testing"))
import sam2.sam2_video_predictor_npz as npz_predictor  # noqa: E402
import sam2.utils.misc as sam2_misc  # noqa: E402
from sam2.build_sam import build_sam2_video_predictor_npz  # noqa: E402
from upstream_golden import SAM21_TINY, UPSTREAM, make_volume, random_weights  # noqa: E402

CASES = {
    "ct": dict(modality="ct", window=[40.0, 400.0], prompt=dict(index=4, box=[24, 14, 56, 46])),
    "mr": dict(modality="mr", window=None, prompt=dict(index=4, points=[[40, 26]], labels=[1])),
}
SIZE = 512


def cpu_connected_components(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and per-pixel component areas of ``[N, 1, H, W]`` masks, 8-connected, as their CUDA kernel."""
    labels = np.zeros(mask.shape, np.int32)
    areas = np.zeros(mask.shape, np.int32)
    for i in range(mask.shape[0]):
        lab = measure.label(mask[i, 0].cpu().numpy().astype(bool), connectivity=2)
        counts = np.bincount(lab.ravel())
        counts[0] = 0
        labels[i, 0], areas[i, 0] = lab, counts[lab]
    return torch.from_numpy(labels), torch.from_numpy(areas)


def float32_storage(module: types.ModuleType) -> None:
    """Make ``torch.bfloat16`` inside ``module`` mean float32 (their memory-feature storage cast)."""
    proxy = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    proxy.bfloat16 = torch.float32
    module.torch = proxy


def prepare(volume: np.ndarray, modality: str, window: list[float] | None) -> np.ndarray:
    """Their intensity preparation (CT window or non-zero percentiles, min-max to 0-255, uint8)."""
    if modality == "ct":
        low, high = window[0] - window[1] / 2, window[0] + window[1] / 2
    else:
        low, high = np.percentile(volume[volume > 0], 0.5), np.percentile(volume[volume > 0], 99.5)
    pre = np.clip(volume, low, high)
    pre = (pre - np.min(pre)) / (np.max(pre) - np.min(pre)) * 255.0
    if modality != "ct":
        pre[volume == 0] = 0
    return np.uint8(pre)


def model_frames(prepared: np.ndarray) -> torch.Tensor:
    """Their resize (8-bit RGB, Pillow's default filter) and normalisation: ``[T, 3, 512, 512]`` float64."""
    frames = np.zeros((len(prepared), 3, SIZE, SIZE))
    for i, img in enumerate(prepared):
        frames[i] = np.array(
            Image.fromarray(img.astype(np.uint8)).convert("RGB").resize((SIZE, SIZE))
        ).transpose(2, 0, 1)
    frames = torch.from_numpy(frames / 255.0)
    mean = torch.tensor((0.485, 0.456, 0.406), dtype=torch.float32)[:, None, None]
    std = torch.tensor((0.229, 0.224, 0.225), dtype=torch.float32)[:, None, None]
    return (frames - mean) / std


def run_case(predictor, volume: np.ndarray, case: dict) -> dict[str, np.ndarray]:
    prepared = prepare(volume, case["modality"], case["window"])
    frames = model_frames(prepared)
    height, width = prepared.shape[1:]
    p = case["prompt"]
    found, directions = np.zeros(prepared.shape, bool), {}
    with torch.inference_mode():
        state = predictor.init_state(frames, height, width)
        for reverse in (False, True):
            predictor.add_new_points_or_box(
                inference_state=state,
                frame_idx=p["index"],
                obj_id=1,
                box=None if "box" not in p else np.array(p["box"]),
                points=None if "points" not in p else np.array(p["points"], np.float32),
                labels=None if "labels" not in p else np.array(p["labels"], np.int32),
            )
            logits = np.full(prepared.shape, np.nan, np.float32)
            for t, _, out in predictor.propagate_in_video(state, reverse=reverse):
                logits[t] = out[0, 0].float().numpy()
                found[t] |= out[0, 0].numpy() > 0
            predictor.reset_state(state)
            directions["reverse" if reverse else "forward"] = logits
    regions = measure.label(found)
    final = regions == np.argmax(np.bincount(regions.flat)[1:]) + 1 if found.any() else found
    index = p["index"]
    return {
        "volume": volume,
        "prepared": prepared,
        "model_input_crop": frames[index, :, 192:256, 224:288].float().numpy(),
        "forward_logits": directions["forward"].astype(np.float16),
        "reverse_logits": directions["reverse"].astype(np.float16),
        "mask": final.astype(np.uint8),
    }


def main() -> None:
    sam2_misc.get_connected_components = cpu_connected_components
    float32_storage(npz_predictor)
    predictor = build_sam2_video_predictor_npz("configs/sam2.1_hiera_t512.yaml", None, device="cpu")
    keys = json.loads((REPO / "Testing" / "data" / "sam2-keys.json").read_text())[SAM21_TINY]["keys"]
    predictor.load_state_dict(random_weights(keys), strict=True)
    predictor.eval()
    UPSTREAM.mkdir(parents=True, exist_ok=True)
    for name, case in CASES.items():
        arrays = run_case(predictor, make_volume(name), case)
        np.savez_compressed(UPSTREAM / f"{name}.npz", **arrays)
        meta = {**case, "oracle": "bowang-lab/MedSAM2 build_sam2_video_predictor_npz, sam2.1_hiera_t512.yaml"}
        (UPSTREAM / f"{name}.json").write_text(json.dumps(meta, indent=1))
        print(name, "mask voxels", int(arrays["mask"].sum()), "of", arrays["mask"].size)


if __name__ == "__main__":
    main()
