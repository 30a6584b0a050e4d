"""Parity of our prompt encoder + mask decoder with the official SAM 2 ones (test oracle, run by hand).

    /work/oracle_venv/bin/python scripts/oracle/check_sam_heads.py

Builds the official ``sam2.modeling.sam`` PromptEncoder / MaskDecoder with SAM 2's settings, copies their
random weights into ours (strict load, so the key sets must match), feeds both identical random image
embeddings and prompts, and prints the max abs difference of every output. Exits 1 above the tolerance.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedSAM2Slicer"))

from sam2.modeling.sam.mask_decoder import MaskDecoder as OfficialMaskDecoder  # noqa: E402
from sam2.modeling.sam.prompt_encoder import PromptEncoder as OfficialPromptEncoder  # noqa: E402
from sam2.modeling.sam.transformer import TwoWayTransformer as OfficialTwoWayTransformer  # noqa: E402

from medsam2.model.mask_decoder import MaskDecoder  # noqa: E402
from medsam2.model.prompt_encoder import PromptEncoder  # noqa: E402
from medsam2.model.two_way_transformer import TwoWayTransformer  # noqa: E402

TOLERANCE = 1e-4
EMBED_DIM = 256


def decoder_settings(sam2_heads: bool) -> dict:
    """SAM 2's decoder flags, or the original SAM / LiteMedSAM decoder (no high-res, no object score)."""
    return dict(
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
        use_high_res_features=sam2_heads,
        iou_prediction_use_sigmoid=sam2_heads,
        dynamic_multimask_via_stability=sam2_heads,
        dynamic_multimask_stability_delta=0.05,
        dynamic_multimask_stability_thresh=0.98,
        pred_obj_scores=sam2_heads,
        pred_obj_scores_mlp=sam2_heads,
        use_multimask_token_for_obj_ptr=sam2_heads,
    )


def randomize_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Matrices keep their random init; biases and norm scales (zeros / ones at init) get noise too, so
    that every parameter influences the outputs."""
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.ndim == 1:
                noise = 0.2 * torch.randn(tensor.shape, generator=generator)
                tensor.copy_(noise + 1.0 if name.endswith("weight") else noise)


def build_pair(image_size: int, sam2_heads: bool, generator: torch.Generator):
    # The matrices take their init from the global RNG: seed it so that every check is reproducible alone.
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
    grid = image_size // 16
    official_pe = OfficialPromptEncoder(
        embed_dim=EMBED_DIM,
        image_embedding_size=(grid, grid),
        input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )
    official_dec = OfficialMaskDecoder(
        transformer_dim=EMBED_DIM,
        transformer=OfficialTwoWayTransformer(depth=2, embedding_dim=EMBED_DIM, mlp_dim=2048, num_heads=8),
        **decoder_settings(sam2_heads),
    )
    ours_pe = PromptEncoder(EMBED_DIM, (grid, grid), (image_size, image_size), mask_in_chans=16)
    ours_dec = MaskDecoder(
        EMBED_DIM,
        TwoWayTransformer(depth=2, embedding_dim=EMBED_DIM, num_heads=8, mlp_dim=2048),
        **decoder_settings(sam2_heads),
    )
    randomize_(official_pe, generator)
    randomize_(official_dec, generator)
    ours_pe.load_state_dict(official_pe.state_dict(), strict=True)
    ours_dec.load_state_dict(official_dec.state_dict(), strict=True)
    for m in (official_pe, official_dec, ours_pe, ours_dec):
        m.eval()
    return (official_pe, official_dec), (ours_pe, ours_dec)


def make_prompts(case: str, batch: int, image_size: int, generator: torch.Generator):
    """(points, boxes, masks) for the official call signature; boxes also go in as labelled corners."""
    grid = image_size // 16

    def coords(n: int) -> torch.Tensor:
        return torch.rand(batch, n, 2, generator=generator) * image_size

    points = boxes = masks = None
    if case == "clicks":
        labels = torch.randint(0, 2, (batch, 3), generator=generator)
        labels[:, 0] = 1
        points = (coords(3), labels.int())
    elif case == "clicks_with_padding":
        labels = torch.tensor([[1, 0, -1], [1, -1, -1]])[:batch].int()
        points = (coords(3), labels)
    elif case == "box_as_corners":
        corner = coords(2).sort(dim=1).values
        points = (corner, torch.tensor([[2, 3]]).expand(batch, 2).int())
    elif case == "box_argument":
        corner = coords(2).sort(dim=1).values
        boxes = corner.reshape(batch, 4)
    elif case == "box_and_clicks_with_mask":
        corner = coords(2).sort(dim=1).values
        clicks = coords(2)
        labels = torch.tensor([[2, 3, 1, 0]]).expand(batch, 4).int()
        points = (torch.cat([corner, clicks], dim=1), labels)
        masks = torch.randn(batch, 1, 4 * grid, 4 * grid, generator=generator) * 4
    elif case == "clicks_and_box_argument":
        points = (coords(2), torch.tensor([[1, 0]]).expand(batch, 2).int())
        boxes = coords(2).sort(dim=1).values.reshape(batch, 4)
    elif case == "mask_only":
        masks = torch.randn(batch, 1, 4 * grid, 4 * grid, generator=generator) * 4
    elif case == "nothing":
        pass
    else:
        raise ValueError(case)
    return points, boxes, masks


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def compare(image_size: int, sam2_heads: bool, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    (off_pe, off_dec), (our_pe, our_dec) = build_pair(image_size, sam2_heads, generator)
    grid = image_size // 16
    worst = max_diff(off_pe.get_dense_pe(), our_pe.get_dense_pe())
    variant = "SAM 2 heads" if sam2_heads else "SAM / LiteMedSAM heads"
    print(f"\n== image {image_size} ({grid}x{grid}), {variant}: dense_pe {worst:.2e}")

    cases = [
        "clicks",
        "clicks_with_padding",
        "box_as_corners",
        "box_argument",
        "box_and_clicks_with_mask",
        "clicks_and_box_argument",
        "mask_only",
        "nothing",
    ]
    batch = 2
    for case in cases:
        points, boxes, masks = make_prompts(case, batch, image_size, generator)
        with torch.no_grad():
            sparse_o, dense_o = off_pe(points, boxes, masks)
            sparse_u, dense_u = our_pe(points, boxes, masks)
        case_batch = sparse_o.shape[0]
        line = f"{case:26s} sparse {tuple(sparse_o.shape)} {max_diff(sparse_o, sparse_u):.2e}"
        line += f" dense {max_diff(dense_o, dense_u):.2e}"
        worst = max(worst, max_diff(sparse_o, sparse_u), max_diff(dense_o, dense_u))
        print(line)
        for repeat_image in (False, True):
            image_batch = 1 if repeat_image else case_batch
            image = torch.randn(image_batch, EMBED_DIM, grid, grid, generator=generator)
            high_res = None
            if sam2_heads:
                high_res = [
                    torch.randn(case_batch, EMBED_DIM // 8, 4 * grid, 4 * grid, generator=generator),
                    torch.randn(case_batch, EMBED_DIM // 4, 2 * grid, 2 * grid, generator=generator),
                ]
            for multimask in (False, True):
                args = (image, off_pe.get_dense_pe(), sparse_o, dense_o)
                kwargs = dict(
                    multimask_output=multimask, repeat_image=repeat_image, high_res_features=high_res
                )
                with torch.no_grad():
                    out_o = off_dec(*args, **kwargs)
                    out_u = our_dec(*args, **kwargs)
                diffs = [max_diff(a, b) for a, b in zip(out_o, out_u, strict=True)]
                worst = max(worst, *diffs)
                names = ("masks", "iou", "tokens", "obj")
                detail = "  ".join(
                    f"{n} {tuple(a.shape)} {d:.2e}" for n, a, d in zip(names, out_o, diffs, strict=True)
                )
                print(f"    repeat={int(repeat_image)} multimask={int(multimask)}: {detail}")
    return worst


def check_stability_selection(scale_single_mask: float) -> float:
    """With dynamic stability on and one mask asked for, each prompt keeps the single-mask output or falls
    back to a multimask one. Scaling the single-mask hypernetwork's last layer makes its logits large, hence
    stable, so both branches get compared; reports how often the fallback was taken."""
    generator = torch.Generator().manual_seed(7)
    (off_pe, off_dec), (our_pe, our_dec) = build_pair(512, True, generator)
    with torch.no_grad():
        for decoder in (off_dec, our_dec):
            decoder.output_hypernetworks_mlps[0].layers[2].weight.mul_(scale_single_mask)
    batch = 8
    points, _, _ = make_prompts("clicks", batch, 512, generator)
    sparse, dense = off_pe(points, None, None)
    image = torch.randn(batch, EMBED_DIM, 32, 32, generator=generator)
    high_res = [
        torch.randn(batch, 32, 128, 128, generator=generator),
        torch.randn(batch, 64, 64, 64, generator=generator),
    ]
    args = (image, off_pe.get_dense_pe(), sparse, dense)
    with torch.no_grad():
        all_masks, *_ = off_dec.predict_masks(*args, repeat_image=False, high_res_features=high_res)
        selected_o, iou_o, *_ = off_dec(*args, False, False, high_res)
        selected_u, iou_u, *_ = our_dec(*args, False, False, high_res)
    fell_back = (selected_o[:, 0] != all_masks[:, 0]).flatten(1).any(dim=1)
    diff = max(max_diff(selected_o, selected_u), max_diff(iou_o, iou_u))
    print(
        f"single-mask weight x{scale_single_mask:g}: fallback to a multimask output for "
        f"{int(fell_back.sum())}/{batch} prompts; max diff {diff:.2e}"
    )
    return diff


def check_harness_sees_a_difference() -> None:
    """A tiny change to one of our weights must show up, or the zeros above mean nothing."""
    generator = torch.Generator().manual_seed(3)
    (off_pe, off_dec), (our_pe, our_dec) = build_pair(512, True, generator)
    with torch.no_grad():
        our_dec.transformer.layers[1].norm4.bias.add_(1e-3)
    points, _, _ = make_prompts("clicks", 1, 512, generator)
    sparse, dense = off_pe(points, None, None)
    image = torch.randn(1, EMBED_DIM, 32, 32, generator=generator)
    high_res = [
        torch.randn(1, 32, 128, 128, generator=generator),
        torch.randn(1, 64, 64, 64, generator=generator),
    ]
    args = (image, off_pe.get_dense_pe(), sparse, dense, True, False, high_res)
    with torch.no_grad():
        diff = max_diff(off_dec(*args)[0], our_dec(*args)[0])
    print(f"harness self-check: norm4.bias + 1e-3 in ours changes masks by {diff:.2e} (must be > 0)")
    if diff == 0.0:
        raise AssertionError("the comparison cannot see a perturbed weight")


def main() -> int:
    torch.manual_seed(0)
    worst = 0.0
    for image_size in (1024, 512):
        worst = max(worst, compare(image_size, sam2_heads=True, seed=image_size))
    worst = max(worst, compare(1024, sam2_heads=False, seed=1))
    print()
    for scale in (1.0, 15.0, 20.0, 1000.0):  # all fall back, mixes (7 and 1 of 8), none
        worst = max(worst, check_stability_selection(scale))
    check_harness_sees_a_difference()
    print(f"\nworst max abs difference: {worst:.3e} (tolerance {TOLERANCE:.0e})")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
