"""Write the golden files of the parity tests with the official SAM 2 package as the oracle.

Run by hand, never in CI:

    python3 -m venv /tmp/oracle && /tmp/oracle/bin/pip install torch==2.13.0 numpy safetensors
    /tmp/oracle/bin/pip install --no-deps sam2==1.1.0 && /tmp/oracle/bin/pip install hydra-core iopath tqdm pillow
    /tmp/oracle/bin/python scripts/oracle/make_golden.py            # writes Testing/data/golden/

For a small custom configuration in the SAM 2.0 and SAM 2.1 flavours it builds the official
``SAM2VideoPredictor`` with random weights, saves the weights (safetensors), the frames and the oracle's
outputs: single-frame predictions (box, one click, positive + negative clicks, mask prompt) and a two-object
propagation with prompts on two frames, forward then reverse, then corrections and re-propagation.

Differences from the predictor's defaults, both needed for a float32 CPU reference: memory features are kept in
float32 (the official code stores them as bfloat16) and hole filling is off (it needs a CUDA extension).
Corrections on tracked frames become conditioning frames (``add_all_frames_to_correct_as_cond=True``), which
is what our Session does.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import sam2.sam2_video_predictor as official_vp
import torch
from safetensors.torch import save_file
from sam2.modeling.backbones.hieradet import Hiera
from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
from sam2.modeling.memory_attention import MemoryAttention, MemoryAttentionLayer
from sam2.modeling.memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder
from sam2.modeling.position_encoding import PositionEmbeddingSine
from sam2.modeling.sam.mask_decoder import MaskDecoder
from sam2.modeling.sam.transformer import RoPEAttention, TwoWayTransformer

OUT = Path(__file__).resolve().parents[2] / "Testing" / "data" / "golden"

# The small configuration, in the field names of medsam2.ModelConfig.
TINY = dict(
    name="tiny-test",
    image_size=128,
    hiera_embed_dim=8,
    hiera_num_heads=1,
    hiera_stages=[1, 1, 2, 1],
    hiera_global_att_blocks=[3],
    hiera_window_pos_embed_bkg_spatial_size=[4, 4],
    hiera_window_spec=[8, 4, 4, 4],
    hidden_dim=64,
    mem_dim=16,
    decoder_mlp_dim=128,
    memory_attention_layers=2,
    memory_attention_feedforward=128,
)

NUM_FRAMES, HEIGHT, WIDTH = 8, 64, 80


def build_oracle(version: str) -> official_vp.SAM2VideoPredictor:
    c, mem, size = TINY["hidden_dim"], TINY["mem_dim"], TINY["image_size"]
    trunk = Hiera(
        embed_dim=TINY["hiera_embed_dim"],
        num_heads=TINY["hiera_num_heads"],
        stages=TINY["hiera_stages"],
        global_att_blocks=TINY["hiera_global_att_blocks"],
        window_pos_embed_bkg_spatial_size=TINY["hiera_window_pos_embed_bkg_spatial_size"],
        window_spec=TINY["hiera_window_spec"],
    )
    neck = FpnNeck(
        position_encoding=PositionEmbeddingSine(num_pos_feats=c),
        d_model=c,
        backbone_channel_list=trunk.channel_list,
        fpn_top_down_levels=[2, 3],
        fpn_interp_model="nearest",
    )

    def rope(kv_in_dim=None):
        extra = dict(rope_k_repeat=True, kv_in_dim=kv_in_dim) if kv_in_dim else {}
        return RoPEAttention(
            rope_theta=10000.0,
            feat_sizes=[size // 16] * 2,
            embedding_dim=c,
            num_heads=1,
            downsample_rate=1,
            dropout=0.1,
            **extra,
        )

    layer = MemoryAttentionLayer(
        activation="relu",
        dim_feedforward=TINY["memory_attention_feedforward"],
        dropout=0.1,
        pos_enc_at_attn=False,
        self_attention=rope(),
        d_model=c,
        pos_enc_at_cross_attn_keys=True,
        pos_enc_at_cross_attn_queries=False,
        cross_attention=rope(mem),
    )
    memory_attention = MemoryAttention(
        d_model=c, pos_enc_at_input=True, layer=layer, num_layers=TINY["memory_attention_layers"]
    )
    memory_encoder = MemoryEncoder(
        out_dim=mem,
        position_encoding=PositionEmbeddingSine(num_pos_feats=mem),
        mask_downsampler=MaskDownSampler(embed_dim=c, kernel_size=3, stride=2, padding=1),
        fuser=Fuser(
            CXBlock(dim=c, kernel_size=7, padding=3, layer_scale_init_value=1e-6, use_dwconv=True), 2
        ),
        in_dim=c,
    )
    is21 = version == "2.1"
    model = official_vp.SAM2VideoPredictor(
        image_encoder=ImageEncoder(trunk=trunk, neck=neck, scalp=1),
        memory_attention=memory_attention,
        memory_encoder=memory_encoder,
        num_maskmem=7,
        image_size=size,
        sigmoid_scale_for_mem_enc=20.0,
        sigmoid_bias_for_mem_enc=-10.0,
        use_mask_input_as_output_without_sam=True,
        directly_add_no_mem_embed=True,
        no_obj_embed_spatial=is21,
        use_high_res_features_in_sam=True,
        multimask_output_in_sam=True,
        iou_prediction_use_sigmoid=True,
        use_obj_ptrs_in_encoder=True,
        add_tpos_enc_to_obj_ptrs=is21,
        proj_tpos_enc_in_obj_ptrs=is21,
        use_signed_tpos_enc_to_obj_ptrs=is21,
        only_obj_ptrs_in_the_past_for_eval=True,
        pred_obj_scores=True,
        pred_obj_scores_mlp=True,
        fixed_no_obj_ptr=True,
        multimask_output_for_tracking=True,
        use_multimask_token_for_obj_ptr=True,
        multimask_min_pt_num=0,
        multimask_max_pt_num=1,
        use_mlp_for_obj_ptr_proj=True,
        binarize_mask_from_pts_for_mem_enc=True,
        sam_mask_decoder_extra_args=dict(
            dynamic_multimask_via_stability=True,
            dynamic_multimask_stability_delta=0.05,
            dynamic_multimask_stability_thresh=0.98,
        ),
        fill_hole_area=0,
        add_all_frames_to_correct_as_cond=True,
    )
    # The decoder's MLP width is fixed at 2048 in the official builder; a narrower one keeps the files small.
    model.sam_mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=c, mlp_dim=TINY["decoder_mlp_dim"], num_heads=8),
        transformer_dim=c,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
        use_high_res_features=True,
        iou_prediction_use_sigmoid=True,
        pred_obj_scores=True,
        pred_obj_scores_mlp=True,
        use_multimask_token_for_obj_ptr=True,
        dynamic_multimask_via_stability=True,
        dynamic_multimask_stability_delta=0.05,
        dynamic_multimask_stability_thresh=0.98,
    )
    return model.eval()


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Spread the weights so that the decisions (object present, best mask) are not near ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim <= 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / max(fan_in, 1) ** 0.5)
        # Stored as float16 to keep the files small: round first so that both sides use the same values.
        for t in model.state_dict().values():
            t.copy_(t.half().float())


def make_frames(seed: int) -> np.ndarray:
    """Gray frames with two bright blobs that move, on a textured background: uint8 ``[T, H, W]``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    frames = []
    for t in range(NUM_FRAMES):
        img = 0.25 + 0.05 * rng.standard_normal((HEIGHT, WIDTH))
        img += 0.6 * (((xx - 28 - 1.5 * t) / 12) ** 2 + ((yy - 32) / 14) ** 2 < 1)
        img += 0.4 * (((xx - 56) / 7) ** 2 + ((yy - 20 - t) / 8) ** 2 < 1)
        frames.append(np.clip(img, 0, 1))
    return (np.stack(frames) * 255).round().astype(np.uint8)


def model_images(frames: np.ndarray, size: int) -> torch.Tensor:
    """The frames as the model input ``[T, 3, S, S]``: the same resizing and normalisation our FrameStack uses."""
    x = torch.from_numpy(frames).float().div(255)[:, None].expand(-1, 3, -1, -1)
    x = torch.nn.functional.interpolate(
        x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


def keep_memory_in_float32() -> None:
    """The official predictor casts stored memory features to torch.bfloat16; make that name mean float32."""
    proxy = types.ModuleType("torch_float32_memory")
    proxy.__dict__.update({k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    proxy.bfloat16 = torch.float32
    official_vp.torch = proxy


class DecisionMargins:
    """Records how close the oracle's discrete decisions came to flipping."""

    def __init__(self, decoder: torch.nn.Module) -> None:
        self.object_scores, self.iou_gaps = [], []
        original = decoder.forward

        def recording_forward(*args, **kwargs):
            masks, ious, tokens, scores = original(*args, **kwargs)
            self.object_scores.append(scores.abs().min().item())
            if ious.shape[-1] > 1:
                top2 = ious.topk(2, dim=-1).values
                self.iou_gaps.append((top2[..., 0] - top2[..., 1]).min().item())
            return masks, ious, tokens, scores

        decoder.forward = recording_forward

    def summary(self) -> dict:
        return {
            "min_abs_object_score": min(self.object_scores),
            "min_iou_gap": min(self.iou_gaps) if self.iou_gaps else None,
        }


def single_frame_outputs(model, images: torch.Tensor) -> dict[str, np.ndarray]:
    out = {}
    with torch.inference_mode():
        backbone = model.forward_image(images[3:4])
        _, feats, pos, sizes = model._prepare_backbone_features(backbone)
        c, (h, w) = model.hidden_dim, sizes[-1]
        high_res = [x.permute(1, 2, 0).view(1, x.shape[-1], *s) for x, s in zip(feats[:-1], sizes[:-1])]
        pix = (feats[-1] + model.no_mem_embed).permute(1, 2, 0).view(1, c, h, w)
        prompts = {
            "box": (torch.tensor([[[30.0, 40.0], [90.0, 100.0]]]), torch.tensor([[2, 3]], dtype=torch.int32)),
            "click": (torch.tensor([[[50.0, 60.0]]]), torch.tensor([[1]], dtype=torch.int32)),
            "clicks": (
                torch.tensor([[[50.0, 60.0], [95.0, 40.0]]]),
                torch.tensor([[1, 0]], dtype=torch.int32),
            ),
        }
        for name, (coords, labels) in prompts.items():
            point_inputs = {"point_coords": coords, "point_labels": labels}
            multimask = model._use_multimask(True, point_inputs)
            low_all, _, ious, _, _, obj_ptr, score = model._forward_sam_heads(
                pix, point_inputs=point_inputs, high_res_features=high_res, multimask_output=multimask
            )
            out.update(
                {
                    f"{name}/masks": low_all,
                    f"{name}/ious": ious,
                    f"{name}/obj_ptr": obj_ptr,
                    f"{name}/object_score": score,
                }
            )
            out[f"{name}/coords"], out[f"{name}/labels"] = coords, labels
        mask = torch.zeros(1, 1, 128, 128)
        mask[..., 30:90, 20:70] = 1
        raw = feats[-1].permute(1, 2, 0).view(1, c, h, w)
        low, high, ious, _, _, obj_ptr, score = model._use_mask_as_output(raw, high_res, mask)
        out.update(
            {
                "mask/input": mask,
                "mask/low_res": low,
                "mask/high_res": high,
                "mask/obj_ptr": obj_ptr,
                "mask/object_score": score,
            }
        )
    return {k: v.detach().float().numpy() if isinstance(v, torch.Tensor) else v for k, v in out.items()}


# The multi-frame scenario; the parity test replays the same steps on our Session.
SCENARIO = [
    {"op": "prompt", "frame": 2, "obj_id": 1, "box": [16, 17, 46, 47]},
    {"op": "prompt", "frame": 5, "obj_id": 2, "points": [[56, 25], [30, 32]], "labels": [1, 0]},
    {"op": "propagate", "start": None, "reverse": False},
    {"op": "propagate", "start": 5, "reverse": True},
    {"op": "prompt", "frame": 4, "obj_id": 1, "points": [[34, 32]], "labels": [1]},
    {"op": "prompt", "frame": 6, "obj_id": 2, "mask": [[19, 50, 33, 63]]},
    {"op": "propagate", "start": None, "reverse": False},
    {"op": "propagate", "start": 7, "reverse": True},
]


def scenario_mask(rect: list[list[int]]) -> np.ndarray:
    """A boolean ``[H, W]`` mask made of ``[y0, x0, y1, x1]`` rectangles."""
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    for y0, x0, y1, x1 in rect:
        mask[y0:y1, x0:x1] = True
    return mask


def run_scenario(model, images: torch.Tensor) -> dict[str, np.ndarray]:
    official_vp.load_video_frames = lambda **kw: (images, HEIGHT, WIDTH)
    state = model.init_state(video_path="unused")
    out = {}
    for step, op in enumerate(SCENARIO):
        if op["op"] == "prompt":
            if "mask" in op:
                _, ids, logits = model.add_new_mask(
                    state, op["frame"], op["obj_id"], scenario_mask(op["mask"])
                )
            else:
                _, ids, logits = model.add_new_points_or_box(
                    state,
                    op["frame"],
                    op["obj_id"],
                    points=op.get("points"),
                    labels=op.get("labels"),
                    box=op.get("box"),
                )
            out[f"step{step}/prompt"] = logits[ids.index(op["obj_id"]), 0].numpy()
        else:
            for t, ids, logits in model.propagate_in_video(
                state, start_frame_idx=op["start"], reverse=op["reverse"]
            ):
                for i, obj_id in enumerate(ids):
                    out[f"step{step}/frame{t}/obj{obj_id}"] = logits[i, 0].numpy()
    return out


def main() -> None:
    keep_memory_in_float32()
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    frames = make_frames(seed)
    for version in ("2.0", "2.1"):
        torch.manual_seed(seed)
        model = build_oracle(version)
        randomise(model, seed + (1 if version == "2.1" else 0))
        margins = DecisionMargins(model.sam_mask_decoder)
        images = model_images(frames, TINY["image_size"])
        single = single_frame_outputs(model, images)
        sequence = run_scenario(model, images)
        folder = OUT / f"sam{version}"
        folder.mkdir(parents=True, exist_ok=True)
        weights = {k: v.half().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(folder / "weights.safetensors"))
        np.savez_compressed(folder / "single_frame.npz", **single)
        np.savez_compressed(folder / "sequence.npz", **sequence)
        np.save(folder / "frames.npy", frames)
        config = dict(
            TINY,
            no_obj_embed_spatial=version == "2.1",
            add_tpos_enc_to_obj_ptrs=version == "2.1",
            proj_tpos_enc_in_obj_ptrs=version == "2.1",
        )
        meta = {
            "config": config,
            "scenario": SCENARIO,
            "seed": seed,
            "margins": margins.summary(),
            "oracle": "sam2==1.1.0 SAM2VideoPredictor, float32 memory, fill_hole_area=0, "
            "add_all_frames_to_correct_as_cond=True",
        }
        (folder / "meta.json").write_text(json.dumps(meta, indent=1))
        print(version, meta["margins"], f"{len(sequence)} sequence outputs")


if __name__ == "__main__":
    main()
